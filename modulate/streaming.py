"""Async client for the three Velma-2 WebSocket endpoints (STT, SVD, PII redaction streaming).

One `async with websockets.connect(...)` per call: audio goes out as binary frames (awaiting each
send, concurrently with receiving), then the empty text frame ends the stream; parsed events are
yielded until `done`. Close codes and errors go through `classify()`; URLs are always redacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets
import websockets.exceptions
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from ._constants import (
    DEFAULT_MODELS_BASE_URL,
    DEFAULT_STREAM_MAX_SIZE,
    DEFAULT_STREAM_OPEN_TIMEOUT,
    DEFAULT_STREAM_SILENCE_TIMEOUT,
)
from ._urls import redact_text, redact_url
from .errors import Transient, classify
from .models import (
    Done,
    FrameEvent,
    PartialUtterance,
    RedactedAudioWindow,
    StreamEvent,
    UtteranceEvent,
)

__all__ = ["RAW_AUDIO_FORMATS", "StreamParams", "StreamingClient"]

logger = logging.getLogger(__name__)

StreamEndpoint = Literal["stt", "svd", "pii"]
PATHS: dict[str, str] = {
    "stt": "/api/velma-2-stt-streaming",
    "svd": "/api/velma-2-synthetic-voice-detection-streaming",
    "pii": "/api/velma-2-pii-phi-redaction-streaming",
}
RAW_AUDIO_FORMATS: frozenset[str] = frozenset(
    "s8 s16le s16be s24le s24be s32le s32be u8 u16le u16be u24le u24be u32le u32be"
    " f32le f32be f64le f64be mulaw alaw".split()
)
_Closed = websockets.exceptions.ConnectionClosed
_SAMPLE_RATES = frozenset({8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000})


class StreamParams(BaseModel):
    """Query parameters of a streaming connection; each endpoint sends the ones it accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    audio_format: str | None = Field(
        None, description="e.g. 's16le' or 'wav'; required for SVD and for raw audio."
    )
    sample_rate: int | None = Field(None, description="Raw formats only.")
    num_channels: int | None = Field(None, ge=1, le=8, description="Raw formats only.")
    speaker_diarization: bool = True
    emotion_signal: bool = False
    accent_signal: bool = False
    deepfake_signal: bool = False
    pii_phi_tagging: bool = False
    partial_results: bool = False
    start_redaction_padding_ms: int = Field(100, ge=0)
    end_redaction_padding_ms: int = Field(0, ge=0)
    language: str | None = None


class StreamingClient:
    """Client for the streaming endpoints; `base_url` http(s) becomes ws(s)."""

    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str = DEFAULT_MODELS_BASE_URL,
        open_timeout: float = DEFAULT_STREAM_OPEN_TIMEOUT,
        silence_timeout: float = DEFAULT_STREAM_SILENCE_TIMEOUT,
        max_size: int = DEFAULT_STREAM_MAX_SIZE,
    ) -> None:
        if not isinstance(api_key, SecretStr) or not api_key.get_secret_value():
            raise ValueError("api_key must be a non-empty pydantic SecretStr")
        parts = urlsplit(base_url.rstrip("/"))
        scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
        if scheme is None:
            raise ValueError("base_url must be an http(s) or ws(s) URL")
        self._api_key = api_key
        self._ws_base = urlunsplit(parts._replace(scheme=scheme, query="", fragment=""))
        self._open_timeout = open_timeout
        self._silence_timeout = silence_timeout
        self._max_size = max_size

    def url(self, endpoint: StreamEndpoint, params: StreamParams) -> str:
        """The connection URL, key included: never log it, use `redact_url()`."""
        query = {"api_key": self._api_key.get_secret_value(), **_query(endpoint, params)}
        return f"{self._ws_base}{PATHS[endpoint]}?{urlencode(query)}"

    async def stream(
        self, endpoint: StreamEndpoint, audio: AsyncIterable[bytes], params: StreamParams
    ) -> AsyncIterator[StreamEvent]:
        """Send `audio` and yield events until `done` (which is yielded last).

        Break out early with `contextlib.aclosing(client.stream(...))` so the socket closes.
        Raises a ModulateError subclass for any failure, with the URL redacted.
        """
        if endpoint not in PATHS:
            raise ValueError(f"endpoint must be one of {sorted(PATHS)}")
        name = f"{endpoint}-streaming"
        url = self.url(endpoint, params)
        try:
            connection = await websockets.connect(
                url,
                max_size=self._max_size,
                open_timeout=self._open_timeout,
                proxy=None,
                logger=_ws_logger,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            error = classify(endpoint=name, exc=exc)
            logger.debug("%s: connect to %s: %s", name, redact_url(url), type(error).__name__)
            raise error from None
        async with connection as ws:
            sender = asyncio.create_task(_send_audio(ws, audio))
            sender.add_done_callback(_close_on_failure(ws))
            try:
                async for event in _receive(ws, name, endpoint == "pii", self._silence_timeout):
                    yield event
                    if isinstance(event, Done):
                        break
            finally:
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, _Closed):
                    await sender

    async def collect(
        self, endpoint: StreamEndpoint, audio: AsyncIterable[bytes], params: StreamParams
    ) -> list[StreamEvent]:
        """All events of one stream, `done` last."""
        async with contextlib.aclosing(self.stream(endpoint, audio, params)) as events:
            return [event async for event in events]


async def _send_audio(ws: Any, audio: AsyncIterable[bytes]) -> None:
    # Each send waits for the transport's write buffer to drain: backpressure.
    async for chunk in audio:
        if chunk:
            await ws.send(bytes(chunk))
    await ws.send("")


async def _receive(
    ws: Any, name: str, pii: bool, silence_timeout: float
) -> AsyncIterator[StreamEvent]:
    pending: UtteranceEvent | Done | None = None  # PII: waiting for its binary MP3 frame
    error_text: str | None = None
    while True:
        try:
            async with asyncio.timeout(silence_timeout):
                message = await ws.recv()
        except TimeoutError:
            logger.debug("%s: silent for %g s", name, silence_timeout)
            raise Transient(
                f"{name}: no message from the service for {silence_timeout:g} s",
                endpoint=name,
                detail="silence timeout",
            ) from None
        except websockets.exceptions.ConnectionClosed as exc:
            error = classify(endpoint=name, exc=exc, detail=error_text)
            logger.debug("%s: closed -> %s", name, type(error).__name__)
            raise error from None
        if isinstance(message, bytes):
            if pending is None:
                logger.debug("%s: unexpected binary frame ignored", name)
                continue
            event, pending = _attach(pending, message), None
            yield event
            if isinstance(event, Done):
                return
            continue
        try:
            data = json.loads(message) if message else {}
            kind = data.get("type") if isinstance(data, dict) else None
            if kind == "error":
                error_text = redact_text(str(data.get("error", "")))  # the close follows
                continue
            event = _parse(kind, data)
        except (ValueError, ValidationError) as exc:  # ValidationError is a ValueError; explicit
            raise Transient(
                f"{name}: unexpected message ({type(exc).__name__})",
                endpoint=name,
                detail="unexpected message",
            ) from None
        if event is None:
            logger.debug("%s: unknown message type %r ignored", name, kind)
            continue
        if pii and _window(event) is not None:
            pending = event
            continue
        yield event
        if isinstance(event, Done):
            return


def _close_on_failure(ws: Any) -> Any:
    """If the audio source fails, close the socket so the receiver stops waiting for `done`."""

    def callback(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, websockets.exceptions.ConnectionClosed):
            # the close wakes the receiver; awaiting the sender then re-raises `exc`
            closing = asyncio.ensure_future(ws.close(1011, "audio source failed"))
            _background.add(closing)
            closing.add_done_callback(_background.discard)

    return callback


_background: set[asyncio.Future[None]] = set()


def _parse(kind: object, data: dict[str, Any]) -> StreamEvent | None:
    if kind == "utterance":
        return UtteranceEvent.model_validate(data)
    if kind == "partial_utterance":
        return PartialUtterance.model_validate(data.get("partial_utterance") or {})
    if kind == "frame":
        return FrameEvent.model_validate(data)
    if kind == "done":
        return Done.model_validate(data)
    return None


def _window(event: StreamEvent) -> RedactedAudioWindow | None:
    if isinstance(event, UtteranceEvent):
        return event.redacted_audio
    if isinstance(event, Done):
        return event.trailing_redacted_audio
    return None


def _attach(event: UtteranceEvent | Done, audio: bytes) -> UtteranceEvent | Done:
    window = _window(event)
    assert window is not None
    filled = window.model_copy(update={"audio": audio})
    if isinstance(event, UtteranceEvent):
        return event.model_copy(update={"redacted_audio": filled})
    return event.model_copy(update={"trailing_redacted_audio": filled})


def _query(endpoint: str, p: StreamParams) -> dict[str, str]:
    fmt = p.audio_format.lower() if p.audio_format else None
    if fmt == "opus" and endpoint != "svd":
        fmt = "ogg"  # the STT and PII pages ask for audio_format=ogg for Opus
    if endpoint == "svd" and fmt is None:
        raise ValueError("SVD streaming requires audio_format (e.g. 's16le' or 'wav')")
    if fmt in RAW_AUDIO_FORMATS and (p.sample_rate is None or p.num_channels is None):
        raise ValueError(f"raw audio_format {fmt!r} needs sample_rate and num_channels")
    if fmt not in RAW_AUDIO_FORMATS and (p.sample_rate is not None or p.num_channels is not None):
        raise ValueError("sample_rate and num_channels are for raw audio formats only")
    if p.sample_rate is not None and p.sample_rate not in _SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {sorted(_SAMPLE_RATES)}")
    q: dict[str, str] = {}
    if endpoint == "stt":
        for flag in (
            "speaker_diarization", "emotion_signal", "accent_signal", "deepfake_signal",
            "pii_phi_tagging", "partial_results",
        ):
            q[flag] = "true" if getattr(p, flag) else "false"
    elif endpoint == "pii":
        q["speaker_diarization"] = "true" if p.speaker_diarization else "false"
        q["start_redaction_padding_ms"] = str(p.start_redaction_padding_ms)
        q["end_redaction_padding_ms"] = str(p.end_redaction_padding_ms)
    if fmt is not None:
        q["audio_format"] = fmt
    if p.sample_rate is not None and p.num_channels is not None:
        q["sample_rate"] = str(p.sample_rate)
        q["num_channels"] = str(p.num_channels)
    if p.language is not None and endpoint != "svd":
        q["language"] = p.language
    return q


class _RedactingFilter(logging.Filter):
    """websockets logs the request line (with `api_key`) at DEBUG: mask it in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        return True


_ws_logger = logging.getLogger(__name__ + ".websockets")
_ws_logger.addFilter(_RedactingFilter())
