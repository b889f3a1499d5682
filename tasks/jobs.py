"""What each batch model does with one file: the call to make and the rows it yields.

A job is the only model-specific part of a batch run; listing, limits, retries and
Parquet are shared (tasks/batch.py). Its `config()` is hashed into `config_hash`, so a
change of options is a new job for every file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from modulate import (
    BatchClient,
    Redaction,
    RedactionMetadata,
    RedactionOptions,
    STTOptions,
    SVDResult,
    Transcript,
    VFastTranscript,
)
from modulate._constants import BATCH_EXTENSIONS, SVD_EXTENSIONS
from tasks.s3 import AudioObject, write_object

__all__ = [
    "BatchJob",
    "EnglishFastJob",
    "Rows",
    "RedactionJob",
    "SyntheticVoiceJob",
    "TranscriptionJob",
    "config_hash",
    "redacted_audio_key",
    "redaction_rows",
]

Rows = dict[str, list[dict[str, Any]]]


class BatchJob(Protocol):
    """One batch model with its options."""

    model: str
    extensions: frozenset[str]

    def config(self) -> dict[str, Any]: ...

    async def call(self, client: BatchClient, audio: bytes, obj: AudioObject) -> Any: ...

    async def rows(self, result: Any, obj: AudioObject, key: dict[str, Any]) -> Rows:
        """Rows for every table but `files`; `key` holds file_id, config_hash, model, date."""
        ...


def config_hash(job: BatchJob) -> str:
    """A short hash of the model and its options: the second half of a file's ledger key."""
    canonical = json.dumps({"model": job.model, **job.config()}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _utterance_rows(transcript: Transcript | Any, key: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            **key,
            "idx": idx,
            "utterance_uuid": u.utterance_uuid,
            "start_ms": u.start_ms,
            "end_ms": u.end_ms,
            "duration_ms": u.duration_ms,
            "speaker": u.speaker,
            "language": u.language,
            "text": u.text,
            "emotion": getattr(u, "emotion", None),
            "accent": getattr(u, "accent", None),
            "deepfake_score": getattr(u, "deepfake_score", None),
        }
        for idx, u in enumerate(transcript.utterances)
    ]


def _transcript_row(
    text: str, duration_ms: int, utterances: list[Any], key: dict[str, Any]
) -> dict[str, Any]:
    languages = {u.language for u in utterances if u.language}
    return {
        **key,
        "text": text,
        "duration_ms": duration_ms,
        "language": languages.pop() if len(languages) == 1 else None,
        "utterance_count": len(utterances),
    }


@dataclass(frozen=True)
class TranscriptionJob:
    """Velma-2 multilingual batch speech-to-text."""

    options: STTOptions = field(default_factory=STTOptions)
    model: str = "stt"
    extensions: frozenset[str] = BATCH_EXTENSIONS

    def config(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json")

    async def call(self, client: BatchClient, audio: bytes, obj: AudioObject) -> Transcript:
        return await client.transcribe(audio, obj.filename, self.options)

    async def rows(self, result: Transcript, obj: AudioObject, key: dict[str, Any]) -> Rows:
        return {
            "transcripts": [
                _transcript_row(result.text, result.duration_ms, result.utterances, key)
            ],
            "utterances": _utterance_rows(result, key),
        }


@dataclass(frozen=True)
class EnglishFastJob:
    """Velma-2 English VFast: one transcript string per file, no utterances."""

    model: str = "vfast"
    extensions: frozenset[str] = BATCH_EXTENSIONS

    def config(self) -> dict[str, Any]:
        return {}

    async def call(self, client: BatchClient, audio: bytes, obj: AudioObject) -> VFastTranscript:
        return await client.transcribe_english_fast(audio, obj.filename)

    async def rows(self, result: VFastTranscript, obj: AudioObject, key: dict[str, Any]) -> Rows:
        row = _transcript_row(result.text, result.duration_ms, [], key)
        return {"transcripts": [{**row, "utterance_count": None}]}


@dataclass(frozen=True)
class SyntheticVoiceJob:
    """Velma-2 synthetic-voice (deepfake) detection in 4-second frames."""

    model: str = "svd"
    extensions: frozenset[str] = SVD_EXTENSIONS

    def config(self) -> dict[str, Any]:
        return {}

    async def call(self, client: BatchClient, audio: bytes, obj: AudioObject) -> SVDResult:
        return await client.detect_synthetic_voice(audio, obj.filename)

    async def rows(self, result: SVDResult, obj: AudioObject, key: dict[str, Any]) -> Rows:
        frames = [
            {
                **key,
                "frame_idx": idx,
                "start_ms": f.start_time_ms,
                "end_ms": f.end_time_ms,
                "verdict": f.verdict,
                "confidence": f.confidence,
            }
            for idx, f in enumerate(result.frames)
        ]
        return {"detections": frames, "detection_summary": [summarise(result, key)]}


def summarise(result: SVDResult, key: dict[str, Any]) -> dict[str, Any]:
    """One verdict per file: synthetic if any frame with content is."""
    with_content = [f for f in result.frames if f.verdict != "no-content"]
    synthetic = [f for f in with_content if f.verdict == "synthetic"]
    if synthetic:
        verdict = "synthetic"
    elif with_content:
        verdict = "non-synthetic"
    else:
        verdict = "no-content"
    return {
        **key,
        "verdict": verdict,
        "max_synthetic_confidence": max((f.confidence for f in synthetic), default=None),
        "synthetic_fraction": len(synthetic) / len(with_content) if with_content else None,
        "frames": len(result.frames),
        "duration_ms": result.duration_ms,
    }


@dataclass(frozen=True)
class RedactionJob:
    """Velma-2 PII/PHI redaction; the redacted MP3 is written back to S3."""

    s3_client: Any = field(compare=False, repr=False)
    output_bucket: str
    output_prefix: str = "redacted/"
    options: RedactionOptions = field(default_factory=RedactionOptions)
    model: str = "pii"
    extensions: frozenset[str] = BATCH_EXTENSIONS

    def config(self) -> dict[str, Any]:
        return self.options.model_dump(mode="json")

    async def call(self, client: BatchClient, audio: bytes, obj: AudioObject) -> Redaction:
        return await client.redact(audio, obj.filename, self.options)

    def audio_key(self, obj: AudioObject) -> str:
        return redacted_audio_key(self.output_prefix, obj.key)

    async def rows(self, result: Redaction, obj: AudioObject, key: dict[str, Any]) -> Rows:
        uri = await write_object(
            self.s3_client, self.output_bucket, self.audio_key(obj), result.audio, "audio/mpeg"
        )
        return redaction_rows(result.metadata, uri, key)


def redacted_audio_key(prefix: str, key: str) -> str:
    """Where the redacted MP3 of input `key` goes (batch and streaming alike)."""
    stem = key.rsplit(".", 1)[0]
    return f"{prefix.rstrip('/')}/{stem}.redacted.mp3"


def redaction_rows(meta: RedactionMetadata, uri: str, key: dict[str, Any]) -> Rows:
    """The transcripts, utterances and redactions rows of one redacted file."""
    ranges = [{"start_ms": start, "end_ms": end} for start, end in meta.redaction_ranges]
    return {
        "transcripts": [_transcript_row(meta.text, meta.duration_ms, meta.utterances, key)],
        "utterances": _utterance_rows(meta, key),
        "redactions": [
            {
                **key,
                "redacted_text": meta.text,
                "redaction_ranges": ranges,
                "redaction_count": len(ranges),
                "redacted_audio_uri": uri,
                "duration_ms": meta.duration_ms,
            }
        ],
    }
