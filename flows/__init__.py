"""Prefect flows, one module per job a user runs."""

from __future__ import annotations

from flows.detection import detect_synthetic_voice
from flows.platform import platform_jobs
from flows.redaction import redact_pii
from flows.streaming import stream_detect_synthetic_voice, stream_redact_pii, stream_transcribe
from flows.transcription import transcribe, transcribe_english_fast

__all__ = [
    "detect_synthetic_voice",
    "platform_jobs",
    "redact_pii",
    "stream_detect_synthetic_voice",
    "stream_redact_pii",
    "stream_transcribe",
    "transcribe",
    "transcribe_english_fast",
]
