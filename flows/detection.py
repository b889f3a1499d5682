"""Synthetic-voice (deepfake) detection over S3 audio."""

from __future__ import annotations

from prefect import flow
from prefect.states import State

from tasks.jobs import SyntheticVoiceJob
from tasks.runner import RunSettings, run_batch
from tasks.s3 import S3Input

__all__ = ["detect_synthetic_voice"]


@flow(name="modulate-detect-synthetic-voice", log_prints=False)
async def detect_synthetic_voice(
    source: S3Input = S3Input(),
    settings: RunSettings = RunSettings(),
) -> State:
    """Score S3 audio for synthetic voices into the detections and detection_summary tables.

    Each file gets 4-second frames with a verdict and a confidence, and one summary
    row (synthetic if any frame with content is). Files under 0.5 s fail as too short.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        settings: The credentials, org-limits and output block names, and the chunk size.
    """
    return await run_batch(lambda s3, bucket: SyntheticVoiceJob(), source, settings)
