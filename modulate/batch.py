"""Async client for the four Velma-2 batch endpoints (STT, English VFast, SVD, PII redaction).

Requests are built by pure `_build_*()` functions and sent by the one `_send()` (`_http.py`,
shared with the Platform client) that routes every failure through `classify()`. No retry loop
here: retries live in `modulate.limits`.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from python_multipart.multipart import MultipartParser, parse_options_header

from ._constants import (
    BATCH_EXTENSIONS,
    DEFAULT_BATCH_DEADLINE,
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MODELS_BASE_URL,
    MAX_BATCH_BYTES,
    MIME_TYPES,
    SVD_EXTENSIONS,
    SVD_MIN_DURATION_MS,
)
from ._http import _BaseHTTPClient, _json_parser
from .errors import BadInput
from .models import Redaction, RedactionMetadata, SVDResult, Transcript, VFastTranscript

__all__ = [
    "BatchClient",
    "CustomTerm",
    "RedactionOptions",
    "STTOptions",
    "wav_duration_ms",
]

PATHS: dict[str, str] = {
    "stt": "/api/velma-2-stt-batch",
    "vfast": "/api/velma-2-stt-batch-english-vfast",
    "svd": "/api/velma-2-synthetic-voice-detection-batch",
    "pii": "/api/velma-2-pii-phi-redaction-batch",
}


class CustomTerm(BaseModel):
    """A custom vocabulary term for STT (`config.custom_terms`)."""

    model_config = ConfigDict(frozen=True)

    term: str = Field(min_length=1, description="The word or phrase as it should be written.")
    definition: str | None = Field(
        None, max_length=256, description="What it means, to help recognition."
    )
    pronunciations: list[str] | None = Field(
        None, max_length=16, description='X-SAMPA or respellings like "GOO-guhl".'
    )


class STTOptions(BaseModel):
    """Options of the multilingual STT batch endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    speaker_diarization: bool = Field(True, description="Number the speakers (1, 2, ...).")
    emotion_signal: bool = Field(False, description="Tag each utterance with an emotion.")
    accent_signal: bool = Field(False, description="Tag each utterance with an accent.")
    deepfake_signal: bool = Field(
        False, description="Score each utterance from 0 (natural) to 1 (synthetic)."
    )
    pii_phi_tagging: bool = Field(False, description="Wrap PII/PHI spans in tags in the text.")
    language: str | None = Field(None, description="ISO 639-1 hint, e.g. 'en'; sent only if set.")
    custom_terms: list[str | CustomTerm] | None = Field(
        None, max_length=1000, description="Names and jargon to recognise (at most 1,000)."
    )


class RedactionOptions(BaseModel):
    """Options of the PII/PHI redaction batch endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    speaker_diarization: bool = Field(True, description="Number the speakers (1, 2, ...).")
    start_redaction_padding_ms: int = Field(100, ge=0, description="Silence before each range.")
    end_redaction_padding_ms: int = Field(0, ge=0, description="Silence after each range.")
    language: str | None = Field(None, description="ISO 639-1 hint, e.g. 'en'; sent only if set.")


_DEFAULT_STT = STTOptions()
_DEFAULT_REDACTION = RedactionOptions()


class BatchClient(_BaseHTTPClient):
    """Async client for the Velma-2 batch endpoints; use as `async with BatchClient(...) as c:`."""

    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str = DEFAULT_MODELS_BASE_URL,
        timeout: httpx.Timeout = DEFAULT_BATCH_TIMEOUT,
        deadline: float = DEFAULT_BATCH_DEADLINE,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(
            api_key=api_key, base_url=base_url, timeout=timeout, deadline=deadline,
            http_client=http_client,
        )

    async def transcribe(
        self, audio: bytes, filename: str, options: STTOptions = _DEFAULT_STT
    ) -> Transcript:
        """Multilingual transcript with utterances (POST /api/velma-2-stt-batch)."""
        request = _build_stt(self._base_url, self._api_key, audio, filename, options)
        return await self._send("stt", request, _json_parser(Transcript))

    async def transcribe_english_fast(self, audio: bytes, filename: str) -> VFastTranscript:
        """English-only fast transcript, text only (POST /api/velma-2-stt-batch-english-vfast)."""
        request = _build_vfast(self._base_url, self._api_key, audio, filename)
        return await self._send("vfast", request, _json_parser(VFastTranscript))

    async def detect_synthetic_voice(
        self, audio: bytes, filename: str, *, duration_ms: int | None = None
    ) -> SVDResult:
        """Synthetic-voice verdicts per 4 s window (SVD batch).

        `duration_ms`, when known, lets files under 0.5 s fail locally; WAV durations are read
        from the header.
        """
        request = _build_svd(self._base_url, self._api_key, audio, filename, duration_ms)
        return await self._send("svd", request, _json_parser(SVDResult))

    async def redact(
        self, audio: bytes, filename: str, options: RedactionOptions = _DEFAULT_REDACTION
    ) -> Redaction:
        """Redacted text, ranges and MP3 (POST /api/velma-2-pii-phi-redaction-batch)."""
        request = _build_pii(self._base_url, self._api_key, audio, filename, options)
        return await self._send("pii", request, _parse_redaction)


def wav_duration_ms(data: bytes) -> int | None:
    """Duration of a RIFF/WAVE file from its header, or None if `data` is not a readable WAV."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset, byte_rate = 12, None
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (size,) = struct.unpack_from("<I", data, offset + 4)
        body = offset + 8
        if chunk_id == b"fmt " and body + 12 <= len(data):
            (byte_rate,) = struct.unpack_from("<I", data, body + 8)
        elif chunk_id == b"data":
            if not byte_rate:
                return None
            available = min(size, len(data) - body)  # streamed WAVs may say 0xFFFFFFFF
            return available * 1000 // byte_rate
        offset = body + size + (size & 1)
    return None


# --- pure request builders --------------------------------------------------------------------


def _build_stt(
    base_url: str, api_key: SecretStr, audio: bytes, filename: str, options: STTOptions
) -> httpx.Request:
    _precheck("stt", audio, filename, BATCH_EXTENSIONS)
    data = {
        "speaker_diarization": _bool(options.speaker_diarization),
        "emotion_signal": _bool(options.emotion_signal),
        "accent_signal": _bool(options.accent_signal),
        "deepfake_signal": _bool(options.deepfake_signal),
        "pii_phi_tagging": _bool(options.pii_phi_tagging),
    }
    if options.language is not None:
        data["language"] = options.language
    if options.custom_terms is not None:
        terms = [
            t if isinstance(t, str) else t.model_dump(exclude_none=True)
            for t in options.custom_terms
        ]
        data["config"] = json.dumps({"custom_terms": terms}, separators=(",", ":"))
    return _multipart("stt", base_url, api_key, audio, filename, data)


def _build_vfast(base_url: str, api_key: SecretStr, audio: bytes, filename: str) -> httpx.Request:
    _precheck("vfast", audio, filename, BATCH_EXTENSIONS)
    return _multipart("vfast", base_url, api_key, audio, filename, {})


def _build_svd(
    base_url: str, api_key: SecretStr, audio: bytes, filename: str, duration_ms: int | None = None
) -> httpx.Request:
    _precheck("svd", audio, filename, SVD_EXTENSIONS)
    known = duration_ms if duration_ms is not None else wav_duration_ms(audio)
    if known is not None and known < SVD_MIN_DURATION_MS:
        raise BadInput(
            f"svd: audio is {known} ms long; synthetic voice detection needs at least"
            f" {SVD_MIN_DURATION_MS} ms (send a longer clip)",
            endpoint="svd",
            detail="audio too short",
        )
    return _multipart("svd", base_url, api_key, audio, filename, {})


def _build_pii(
    base_url: str, api_key: SecretStr, audio: bytes, filename: str, options: RedactionOptions
) -> httpx.Request:
    _precheck("pii", audio, filename, BATCH_EXTENSIONS)
    data = {
        "speaker_diarization": _bool(options.speaker_diarization),
        "start_redaction_padding_ms": str(options.start_redaction_padding_ms),
        "end_redaction_padding_ms": str(options.end_redaction_padding_ms),
    }
    if options.language is not None:
        data["language"] = options.language
    return _multipart("pii", base_url, api_key, audio, filename, data)


def _multipart(
    endpoint: str,
    base_url: str,
    api_key: SecretStr,
    audio: bytes,
    filename: str,
    data: dict[str, str],
) -> httpx.Request:
    mime = MIME_TYPES[_extension(filename)]
    request = httpx.Request(
        "POST",
        base_url.rstrip("/") + PATHS[endpoint],
        headers={"X-API-Key": api_key.get_secret_value(), "Accept": "application/json"},
        data=data,
        files={"upload_file": (filename, audio, mime)},
    )
    # httpx streams a multipart body as ~4 pieces per field, each its own socket send with
    # its own timeout scope (26 sends for an STT call with its options: most of a call's
    # CPU, measured in bench/). Joined once here, the body goes out in one send; the copy
    # is small next to that (batch files are at most 100 MB, already in memory).
    request.read()
    return request


def _precheck(endpoint: str, audio: bytes, filename: str, allowed: frozenset[str]) -> None:
    if not isinstance(audio, (bytes, bytearray)):
        raise ValueError("audio must be bytes (a re-sendable body)")
    if not filename:
        raise ValueError("filename is required; the server checks its extension")
    ext = _extension(filename)

    def bad(message: str, detail: str) -> BadInput:
        return BadInput(f"{endpoint}: {message}", endpoint=endpoint, detail=detail)

    if not audio:
        raise bad("the file is empty; skip it or re-export the audio", "empty file")
    if len(audio) > MAX_BATCH_BYTES:
        raise bad(
            f"the file is {len(audio)} bytes, over the 100 MB limit; split or compress it",
            "file too large",
        )
    if ext not in allowed:
        raise bad(
            f"unsupported extension {ext!r}; use one of {', '.join(sorted(allowed))}"
            " (rename with the real extension or convert the audio)",
            "unsupported file format",
        )


def _extension(filename: str) -> str:
    name = filename.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _bool(value: bool) -> str:
    return "true" if value else "false"


# --- response parsing -------------------------------------------------------------------------


def _parse_redaction(response: httpx.Response) -> Redaction:
    parts = _decode_multipart(response.headers.get("content-type", ""), response.content)
    if "metadata" not in parts or "audio" not in parts:
        raise ValueError("multipart response lacks a metadata or audio part")
    metadata = RedactionMetadata.model_validate_json(parts["metadata"])
    return Redaction(metadata=metadata, audio=parts["audio"])


def _decode_multipart(content_type: str, body: bytes) -> dict[str, bytes]:
    """Parts of a multipart body by their Content-Disposition name (python-multipart)."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("multipart response without a boundary")
    parts: dict[str, bytes] = {}
    state: dict[str, Any] = {"field": b"", "value": b"", "headers": {}, "data": bytearray()}

    def on_part_begin() -> None:
        state["headers"], state["data"] = {}, bytearray()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("latin-1")
        parts[name] = bytes(state["data"])

    parser = MultipartParser(
        boundary,
        callbacks={  # type: ignore[arg-type]
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    parser.write(body)
    parser.finalize()
    return parts
