"""PII/PHI redaction over S3 audio; the redacted MP3 goes back to S3."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from modulate import RedactionOptions
from tasks.jobs import RedactionJob
from tasks.runner import RunSettings, run_batch
from tasks.s3 import S3Input

__all__ = ["redact_pii"]


@flow(name="modulate-redact-pii", log_prints=False)
async def redact_pii(
    source: S3Input = S3Input(),
    options: RedactionOptions = RedactionOptions(),
    audio_output_prefix: Annotated[
        str, Field(description="Prefix in the input bucket where the redacted MP3s are written.")
    ] = "redacted/",
    settings: RunSettings = RunSettings(),
) -> State:
    """Redact PII/PHI from S3 audio: redacted MP3s to S3, text and ranges to the redactions table.

    A redacted file lands at <audio_output_prefix>/<original key without extension>.redacted.mp3.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Speaker diarization, redaction padding and a language hint.
        audio_output_prefix: Prefix in the input bucket for the redacted MP3s.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await run_batch(
        lambda s3, bucket: RedactionJob(
            s3_client=s3, output_bucket=bucket, output_prefix=audio_output_prefix, options=options
        ),
        source,
        settings,
    )
