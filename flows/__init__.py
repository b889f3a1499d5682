"""Prefect flows, one module per job a user runs."""

from __future__ import annotations

from flows.detection import detect_synthetic_voice
from flows.redaction import redact_pii
from flows.transcription import transcribe, transcribe_english_fast

__all__ = ["detect_synthetic_voice", "redact_pii", "transcribe", "transcribe_english_fast"]
