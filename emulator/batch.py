"""Routes of the four Velma-2 batch endpoints (multipart upload in, JSON or multipart out).

Order of checks: key (X-API-Key) → model enabled → input (field, extension, size, decodable,
length) → monthly → concurrency → admitted. Bad input never takes a slot nor uses the month.
An admitted call holds its slot for the configured latency and may meet a configured fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from emulator import details
from emulator.audio import AudioStream, Block, CorruptAudio, looks_like_text
from emulator.config import OrgConfig
from emulator.content import Transcriber, TranscriptOptions, fake_mp3, is_synthetic, svd_frame
from emulator.state import UNKNOWN_ORG, EmulatorState

__all__ = [
    "MAX_UPLOAD_BYTES",
    "DroppedConnection",
    "RejectedRequest",
    "error_response",
    "router",
    "serve_admitted",
]

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 100 * 1024 * 1024
MIN_SVD_SECONDS = 0.5
READ_CHUNK = 1024 * 1024
UTTERANCE_BLOCK_S = 2.0  # keep in sync with streaming.py (same bytes → same utterances)
SVD_BATCH_WINDOW_S = 4.0
LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]+)*$")
_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}

router = APIRouter()


class DroppedConnection(Exception):
    """Raised after the response head is sent, so uvicorn closes the TCP connection mid-response."""


class RejectedRequest(Exception):
    """A request refused before admission: status, detail and the stats class to count."""

    def __init__(self, status: int, detail: str | list[dict[str, Any]], cls: str = "bad_input",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail)
        self.status, self.detail, self.cls, self.headers = status, detail, cls, headers or {}


class _DroppedResponse(Response):
    """Sends a head promising a body, then fails: the client sees a connection closed early."""

    def __init__(self) -> None:
        super().__init__()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"4096")]})
        raise DroppedConnection("fault injection: connection dropped")


class _CustomTerm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    term: str = Field(min_length=1)
    definition: str | None = Field(default=None, max_length=256)
    pronunciations: list[str] | None = Field(default=None, max_length=16)


class _STTConfig(BaseModel):
    """The STT batch `config` JSON; unknown keys are refused (our choice)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    speaker_diarization: bool | None = None
    emotion_signal: bool | None = None
    accent_signal: bool | None = None
    deepfake_signal: bool | None = None
    pii_phi_tagging: bool | None = None
    language: str | None = None
    custom_terms: list[str | _CustomTerm] | None = Field(default=None, max_length=1000)


def error_response(status: int, detail: Any, headers: dict[str, str] | None = None) -> Response:
    """A JSON `{"detail": ...}` error."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def serve_admitted(
    state: EmulatorState, org: OrgConfig, model: str, audio_seconds: float,
    respond: Callable[[], Response],
) -> Response:
    """Admit (or reject) one call, hold its slot for the latency, apply a fault, then respond."""
    cls = state.admit(org, model, audio_seconds)
    if cls is not None:
        rej = details.batch_rejection(state.config.detail_family, model, cls)
        logger.info("rejected model=%s org=%s class=%s", model, org.name, cls)
        return error_response(rej.status, rej.detail, rej.headers)
    fault = state.draw_fault()
    completed, fault_cls = False, None
    try:
        await asyncio.sleep(state.draw_latency(audio_seconds))
        if fault == "5xx":
            fault_cls = "fault_5xx"
            status, detail = state.rng.choice(details.FIVE_XX[model])
            return error_response(status, detail)
        if fault == "drop":
            fault_cls = "dropped"
            return _DroppedResponse()
        if fault == "slow":
            fault_cls = "slow"
            await asyncio.sleep(state.config.faults.slow_s)
        response = respond()
        completed = True
        if fault == "garbled":
            fault_cls = "garbled"
            # Cut short, as a proxy that mangles bodies would: the work is done and billed.
            body = bytes(response.body)[: max(1, len(response.body) // 3)]
            return Response(body, status_code=200, media_type=response.headers.get("content-type"))
        return response
    finally:
        state.release(org.name, model, completed=completed, fault=fault_cls)


_PATHS: dict[str, str] = {
    "stt": "/api/velma-2-stt-batch",
    "vfast": "/api/velma-2-stt-batch-english-vfast",
    "svd": "/api/velma-2-synthetic-voice-detection-batch",
    "pii": "/api/velma-2-pii-phi-redaction-batch",
}


def _batch_route(model: str) -> Callable[[Request], Awaitable[Response]]:
    async def route(request: Request) -> Response:
        return await _handle(request, model)

    return route


for _model, _path in _PATHS.items():
    router.add_api_route(_path, _batch_route(_model), methods=["POST"], name=f"{_model}_batch")


async def _handle(request: Request, model: str) -> Response:
    state: EmulatorState = request.app.state.emulator
    family = state.config.detail_family
    org_name = UNKNOWN_ORG
    form: FormData | None = None
    try:
        try:
            form = await request.form(max_files=4, max_fields=64)
        except Exception as exc:  # malformed multipart body
            raise RejectedRequest(400, "Invalid request.") from exc
        key = request.headers.get("x-api-key")
        org = state.org_for_key(key) if key else None
        if org is None:
            cls = "missing" if not key else "auth"
            rej = details.batch_rejection(family, model, cls)
            raise RejectedRequest(rej.status, rej.detail, "auth", rej.headers)
        org_name = org.name
        if state.check_access(org, model):
            rej = details.batch_rejection(family, model, "not_enabled")
            raise RejectedRequest(rej.status, rej.detail, "not_enabled")
        options = _options(form, model)
        upload = form.get("upload_file")
        if not isinstance(upload, UploadFile):
            raise RejectedRequest(422, details.missing_field("upload_file"))
        stream, blocks = await _analyze(upload, model, state.config.wav_duration_from_header)
    except RejectedRequest as rej:
        state.reject(org_name, model, rej.cls)
        return error_response(rej.status, rej.detail, rej.headers)
    finally:
        if form is not None:
            await form.close()  # removes the spooled upload
    filename = upload.filename
    return await serve_admitted(
        state, org, model, stream.duration_s,
        lambda: _respond(model, stream, blocks, options, filename),
    )


def _options(form: FormData, model: str) -> TranscriptOptions:
    """Form fields (and the STT `config` JSON, which overrides them) as TranscriptOptions."""
    values: dict[str, Any] = {}
    if model in ("stt", "pii"):
        values["speaker_diarization"] = _form_bool(form, "speaker_diarization", True)
        language = form.get("language")
        if isinstance(language, str) and language:
            if not LANGUAGE_RE.match(language):
                raise RejectedRequest(400, details.invalid_language(language))
            values["language"] = re.split(r"[-_]", language)[0].lower()
    if model == "stt":
        for name in ("emotion_signal", "accent_signal", "deepfake_signal", "pii_phi_tagging"):
            values[name] = _form_bool(form, name, False)
        raw = form.get("config")
        if isinstance(raw, str) and raw:
            values.update(_stt_config(raw))
    if model == "pii":
        values["redact"] = True
        for name, default in (("start_redaction_padding_ms", 100), ("end_redaction_padding_ms", 0)):
            values[name] = _form_int(form, name, default)
    return TranscriptOptions(**values)


def _stt_config(raw: str) -> dict[str, Any]:
    try:
        config = _STTConfig.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise RejectedRequest(400, details.BAD_CONFIG) from exc
    if config.custom_terms is not None:
        terms = [t if isinstance(t, str) else t.model_dump() for t in config.custom_terms]
        if len(json.dumps(terms)) >= 8000:
            raise RejectedRequest(400, details.BAD_CONFIG)
    values = config.model_dump(exclude_none=True, exclude={"custom_terms"})
    if "language" in values:
        if not LANGUAGE_RE.match(values["language"]):
            raise RejectedRequest(400, details.BAD_CONFIG)
        values["language"] = re.split(r"[-_]", values["language"])[0].lower()
    return values


def _form_bool(form: FormData, name: str, default: bool) -> bool:
    value = form.get(name)
    if not isinstance(value, str) or value == "":
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise RejectedRequest(422, details.bool_error(name, value))


def _form_int(form: FormData, name: str, default: int) -> int:
    value = form.get(name)
    if not isinstance(value, str) or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise RejectedRequest(422, details.int_error(name, value))
    return number


async def _analyze(
    upload: UploadFile, model: str, duration_from_header: bool = False
) -> tuple[AudioStream, list[Block]]:
    """Check extension, size and decodability; run the file through an AudioStream."""
    allowed = details.SVD_EXTENSIONS if model == "svd" else details.SUPPORTED_EXTENSIONS
    ext = PurePosixPath(upload.filename or "").suffix.lower()
    if ext not in allowed:
        raise RejectedRequest(400, details.unsupported_format(allowed))
    size = upload.size
    if size is None:
        upload.file.seek(0, 2)
        size = upload.file.tell()
    if size == 0:
        raise RejectedRequest(400, details.EMPTY)
    if size > MAX_UPLOAD_BYTES:
        raise RejectedRequest(413, details.TOO_LARGE)
    await upload.seek(0)
    block_s = SVD_BATCH_WINDOW_S if model == "svd" else UTTERANCE_BLOCK_S
    stream = AudioStream(
        block_s=block_s, container="wav" if ext == ".wav" else "auto",
        duration_from_header=duration_from_header,
    )
    blocks: list[Block] = []
    first = True
    try:
        while chunk := await upload.read(READ_CHUNK):
            if first and looks_like_text(chunk):
                raise CorruptAudio("text, not audio")
            first = False
            blocks.extend(stream.feed(chunk))
        blocks.extend(stream.finish())
    except CorruptAudio as exc:
        raise RejectedRequest(400, details.CORRUPT) from exc
    if model == "svd" and stream.duration_s < MIN_SVD_SECONDS:
        raise RejectedRequest(422, details.TOO_SHORT)
    return stream, blocks


def _respond(
    model: str,
    stream: AudioStream,
    blocks: list[Block],
    options: TranscriptOptions,
    filename: str | None,
) -> Response:
    if model == "svd":
        synthetic = is_synthetic(stream.head_digest)
        frames = [
            svd_frame(b.start_ms, b.end_ms, synthetic=synthetic, digest=b.digest, silent=b.silent)
            for b in blocks
        ]
        return JSONResponse(
            {"filename": filename, "frames": frames, "duration_ms": stream.duration_ms}
        )
    transcriber = Transcriber(options)
    for block in blocks:
        transcriber.utterance(block)
    if model == "vfast":
        return JSONResponse({"text": transcriber.text, "duration_ms": stream.duration_ms})
    body: dict[str, Any] = {
        "text": transcriber.text,
        "duration_ms": stream.duration_ms,
        "utterances": transcriber.utterances,
    }
    if model == "stt":
        return JSONResponse(body)
    body["redaction_ranges"] = transcriber.clamp_ranges(stream.duration_ms)
    return _multipart(body, fake_mp3(stream.digest, stream.duration_ms))


def _multipart(metadata: dict[str, Any], audio: bytes) -> Response:
    """The PII batch answer: multipart/form-data with parts "metadata" (JSON) and "audio"."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\n".encode()
    body = b"".join([
        head,
        b'Content-Disposition: form-data; name="metadata"\r\n',
        b"Content-Type: application/json\r\n\r\n",
        json.dumps(metadata).encode(), b"\r\n",
        head,
        b'Content-Disposition: form-data; name="audio"; filename="redacted.mp3"\r\n',
        b"Content-Type: audio/mpeg\r\n\r\n",
        audio, b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ])
    return Response(body, media_type=f"multipart/form-data; boundary={boundary}")
