"""Tolerant response models for every Modulate response shape (batch, streaming, Platform).

Unknown fields are ignored and optional fields may be missing, because the vendor's doc versions
disagree (API_CONTRACT.md §0.2).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "Done",
    "FrameEvent",
    "JobFile",
    "JobOutcome",
    "JobStatus",
    "PartialUtterance",
    "RealtimeSession",
    "Redaction",
    "RedactedAudioWindow",
    "RedactionMetadata",
    "SVDFrame",
    "SVDResult",
    "StreamEvent",
    "Submission",
    "Transcript",
    "Utterance",
    "UtteranceEvent",
    "VFastTranscript",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Utterance(_Model):
    """One utterance; `end_ms` or `duration_ms` is computed from the other when missing."""

    utterance_uuid: str | None = None
    text: str = ""
    start_ms: int = Field(0, description="Start, in ms from the start of the audio or stream.")
    duration_ms: int | None = None
    end_ms: int | None = Field(None, description="start_ms + duration_ms.")
    speaker: int | None = Field(None, description="1-indexed; consistent within one request.")
    language: str | None = Field(None, description="ISO 639-1 code, e.g. 'en'.")
    emotion: str | None = None
    accent: str | None = None
    deepfake_score: float | None = Field(
        None, description="0.0 natural to 1.0 synthetic; null when disabled or too short."
    )

    @model_validator(mode="before")
    @classmethod
    def _timing(cls, data: Any) -> Any:
        if isinstance(data, dict):
            start, duration, end = (
                _number(data.get(key)) for key in ("start_ms", "duration_ms", "end_ms")
            )
            if start is not None and duration is not None and end is None:
                data = {**data, "end_ms": start + duration}
            elif start is not None and end is not None and duration is None:
                data = {**data, "duration_ms": end - start}
        return data


def _number(value: Any) -> float | None:
    """A timing as sent, also in a string ("2000"); None when absent or not a number (then
    the field's own validation says so)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class Transcript(_Model):
    """Multilingual batch STT result."""

    text: str = ""
    duration_ms: int = Field(0, description="Audio duration; the billing basis.")
    utterances: list[Utterance] = Field(default_factory=list)


class VFastTranscript(_Model):
    """English VFast result: one transcript string, no utterances."""

    text: str = ""
    duration_ms: int = 0


class SVDFrame(_Model):
    """One synthetic-voice-detection window."""

    start_time_ms: int
    end_time_ms: int
    verdict: Literal["synthetic", "non-synthetic", "no-content"]
    confidence: float = Field(description="Confidence (0-1) in the stated verdict.")


class SVDResult(_Model):
    """SVD batch result."""

    filename: str | None = None
    frames: list[SVDFrame] = Field(default_factory=list)
    duration_ms: int = 0


class RedactionMetadata(_Model):
    """The `metadata` part of a PII/PHI redaction response."""

    text: str = Field("", description="Redacted text; the marker syntax varies, treat as opaque.")
    duration_ms: int = 0
    utterances: list[Utterance] = Field(default_factory=list)
    redaction_ranges: list[tuple[int, int]] = Field(
        default_factory=list, description="Merged, padded [start_ms, end_ms] ranges."
    )

    @field_validator("redaction_ranges", mode="before")
    @classmethod
    def _ranges(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        return [
            (item["start_ms"], item["end_ms"]) if isinstance(item, dict) else tuple(item)
            for item in value
        ]


class Redaction(_Model):
    """PII/PHI batch result: metadata and the redacted MP3."""

    metadata: RedactionMetadata
    audio: bytes = Field(repr=False, description="Redacted audio (MP3).")


# --- streaming events -------------------------------------------------------------------------


class PartialUtterance(_Model):
    """An interim STT result; each partial replaces the previous one."""

    type: Literal["partial_utterance"] = "partial_utterance"
    text: str = ""
    start_ms: int | None = None
    speaker: int | None = None
    emotion: str | None = None
    accent: str | None = None
    deepfake_score: float | None = None


class RedactedAudioWindow(_Model):
    """A window of redacted audio (PII streaming) and its MP3 bytes, once received."""

    start_ms: int
    duration_ms: int
    audio: bytes | None = Field(None, repr=False, description="The binary MP3 frame that followed.")


class UtteranceEvent(_Model):
    """A final utterance (STT, PII streaming); PII attaches its redacted audio window."""

    type: Literal["utterance"] = "utterance"
    utterance: Utterance
    redacted_audio: RedactedAudioWindow | None = None


class FrameEvent(_Model):
    """One SVD streaming window."""

    type: Literal["frame"] = "frame"
    frame: SVDFrame


class Done(_Model):
    """End of a stream."""

    type: Literal["done"] = "done"
    duration_ms: int | None = None
    frame_count: int | None = Field(None, description="SVD: number of frames sent.")
    trailing_redacted_audio: RedactedAudioWindow | None = Field(
        None, description="PII: audio after the last utterance."
    )


StreamEvent = PartialUtterance | UtteranceEvent | FrameEvent | Done


# --- Platform ---------------------------------------------------------------------------------


class Submission(_Model):
    """Answer to a Platform file submission."""

    job_id: str
    file_id: str | None = None
    status: str | None = Field(None, description='E.g. "accepting_files" or "processing".')
    api_calls_charged: int | None = None
    estimated_processing_time: str | None = None


class RealtimeSession(_Model):
    """A Platform realtime job; `realtime_url` may carry a token, so it never shows in repr/str."""

    job_id: str
    status: str | None = None
    realtime_url: str = Field(repr=False)

    def __repr__(self) -> str:
        return (
            f"RealtimeSession(job_id={self.job_id!r}, status={self.status!r},"
            f" realtime_url={_without_query(self.realtime_url)!r})"
        )

    __str__ = __repr__


JobOutcome = Literal["running", "completed", "failed", "unreadable"]


class JobFile(_Model):
    """One file of a Platform job, as read from a flat or a nested per-file object."""

    file_id: str | None = Field(None, description="The service's id of the file, when given.")
    filename: str | None = None
    status: str | None = Field(None, description="Per-file status; None: the job's stands.")
    outcome: JobOutcome | None = Field(None, description="`status` read; None: the job's.")
    transcript_text: str | None = Field(None, repr=False, description="The transcript's text.")
    result: dict[str, Any] = Field(
        default_factory=dict, repr=False,
        description="The per-file result (nested or flat), raw; schema unknown.",
    )
    error: str | None = None


class JobStatus(_Model):
    """Platform job status, parsed tolerantly; `raw` is the body as it came."""

    job_id: str | None = None
    status: str | None = Field(None, description="The job's status as the service wrote it.")
    outcome: JobOutcome = Field(description="What the status means, read with the wire settings.")
    problem: str | None = Field(
        None, description="Why the body could not be read (outcome unreadable): expected, got."
    )
    files: list[JobFile] = Field(default_factory=list)
    error: str | None = None
    raw: Any = Field(None, repr=False, description="The decoded JSON body, whole.")


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="***" if parts.query else "", fragment=""))
