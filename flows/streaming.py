"""Streaming flows: S3 audio through the three Velma-2 WebSocket endpoints, any file size.

Each file is read from S3 in ranges and sent as binary frames while the service answers, so
memory stays flat however large the file (docs/streaming.md). Listing, the org's limits
(each stream holds one slot of `stt-streaming`, `svd-streaming` or `pii-streaming`),
retries, the ledger and the Parquet tables are those of the batch flows.
"""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from blocks import ModulateCredentials
from blocks.loading import load_block
from modulate import StreamingClient, StreamParams
from modulate.streaming import StreamEndpoint
from tasks.runner import RunSettings, run_batch
from tasks.s3 import S3Input
from tasks.streaming import StreamJob, check_params

__all__ = ["stream_detect_synthetic_voice", "stream_redact_pii", "stream_transcribe"]

_OPTIONS_HELP = (
    "Connection options. Leave audio_format empty to take it from each file: a WAV header "
    "gives the raw format, sample rate and channels; other files go by their extension. "
    "Set audio_format, sample_rate and num_channels for headerless .pcm/.raw files."
)
Options = Annotated[StreamParams, Field(description=_OPTIONS_HELP)]


@flow(name="modulate-stream-transcribe", log_prints=False)
async def stream_transcribe(
    source: S3Input = S3Input(),
    options: Options = StreamParams(),  # noqa: B008 - frozen pydantic model
    settings: RunSettings = RunSettings(),
) -> State:
    """Transcribe S3 audio over the STT WebSocket into the transcripts and utterances tables.

    Partial results, when asked for, are superseded by the final utterances and not stored.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Connection options; leave audio_format empty to take it from each file.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await _run("stt", source, options, settings)


@flow(name="modulate-stream-detect-synthetic-voice", log_prints=False)
async def stream_detect_synthetic_voice(
    source: S3Input = S3Input(),
    options: Options = StreamParams(),  # noqa: B008 - frozen pydantic model
    settings: RunSettings = RunSettings(),
) -> State:
    """Score S3 audio for synthetic voices over the SVD WebSocket (detections tables).

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Connection options; leave audio_format empty to take it from each file.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await _run("svd", source, options, settings)


@flow(name="modulate-stream-redact-pii", log_prints=False)
async def stream_redact_pii(
    source: S3Input = S3Input(),
    options: Options = StreamParams(),  # noqa: B008 - frozen pydantic model
    audio_output_prefix: Annotated[
        str, Field(description="Prefix in the input bucket where the redacted MP3s are written.")
    ] = "redacted/",
    settings: RunSettings = RunSettings(),
) -> State:
    """Redact PII/PHI over the WebSocket: the MP3 frames, in order, become one S3 object.

    A redacted file lands at <audio_output_prefix>/<original key without extension>.redacted.mp3;
    text, utterances and the spans of redacted utterances go to the redactions table.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Connection options; leave audio_format empty to take it from each file.
        audio_output_prefix: Prefix in the input bucket for the redacted MP3s.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await _run("pii", source, options, settings, audio_output_prefix)


async def _run(
    endpoint: StreamEndpoint,
    source: S3Input,
    options: StreamParams,
    settings: RunSettings,
    output_prefix: str = "redacted/",
) -> State:
    check_params(options)
    client: StreamingClient = (
        await load_block(ModulateCredentials, settings.credentials_block)
    ).streaming_client()
    return await run_batch(
        lambda s3, bucket: StreamJob(
            endpoint, client, s3, options, output_bucket=bucket, output_prefix=output_prefix
        ),
        source,
        settings,
    )
