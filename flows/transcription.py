"""Transcription flows: Velma-2 multilingual STT and English VFast over S3 audio."""

from __future__ import annotations

from prefect import flow
from prefect.states import State

from modulate import STTOptions
from tasks.jobs import EnglishFastJob, TranscriptionJob
from tasks.runner import RunSettings, run_batch
from tasks.s3 import S3Input

__all__ = ["transcribe", "transcribe_english_fast"]


@flow(name="modulate-transcribe", log_prints=False)
async def transcribe(
    source: S3Input = S3Input(),
    options: STTOptions = STTOptions(),
    settings: RunSettings = RunSettings(),
) -> State:
    """Transcribe S3 audio with Velma-2 speech-to-text into the transcripts and utterances tables.

    Files already completed with the same options are skipped; failed and deferred ones
    are sent again. The run holds the organisation's concurrent limit for the `stt` model.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Speaker diarization, emotion/accent/deepfake signals, PII/PHI tagging,
            a language hint and custom terms.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await run_batch(lambda s3, bucket: TranscriptionJob(options), source, settings)


@flow(name="modulate-transcribe-english-fast", log_prints=False)
async def transcribe_english_fast(
    source: S3Input = S3Input(),
    settings: RunSettings = RunSettings(),
) -> State:
    """Transcribe English S3 audio with Velma-2 English VFast (text only, no utterances).

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await run_batch(lambda s3, bucket: EnglishFastJob(), source, settings)
