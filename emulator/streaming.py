"""Routes of the three Velma-2 WebSocket endpoints (STT, SVD, PII streaming).

Every connection is accepted first; a refused one is then closed at once with the contract's
close code (auth and limits) or gets an `error` message and close 1003 (bad parameters). An
admitted stream holds one slot of its model for its whole life and is charged as audio arrives.
Audio is processed incrementally (hash state and counters only), so size is unbounded.
Fault injection: with probability `faults.error_5xx_rate` an admitted stream answers its first
frame with `{"type":"error","error":"Internal server error"}` and closes 1011; with
`faults.slow_rate` it takes all the audio, then keeps the connection open and says nothing
for `faults.slow_s` before it answers (a hung service).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from emulator import details
from emulator.audio import (
    CONTAINER_FORMATS,
    RAW_FORMATS,
    SAMPLE_RATES,
    AudioStream,
    Block,
    CorruptAudio,
    matches_container,
    raw_sample_width,
)
from emulator.batch import LANGUAGE_RE
from emulator.content import Transcriber, TranscriptOptions, fake_mp3, is_synthetic, svd_frame
from emulator.state import UNKNOWN_ORG, EmulatorState

__all__ = ["router"]

logger = logging.getLogger(__name__)

UTTERANCE_BLOCK_S = 2.0  # keep in sync with batch.py (same bytes → same utterances)
SVD_STEP_S = 0.5  # first frame after 0.5 s, then one every second (two steps)
SVD_WINDOW_MS = 4000
SVD_EXTRA_FORMATS: tuple[str, ...] = ("au", "wma", "opus", "amr", "mp4", "m4a", "3gp", "3gpp")
SVD_FORMAT_REQUIRED = (
    "audio_format query parameter is required. "
    "Example: audio_format=s16le&sample_rate=16000&num_channels=1"
)
MISMATCH = "Audio data does not match the declared audio_format."
INVALID_AUDIO = "Invalid input audio"
_BOOLS = {"true": True, "1": True, "false": False, "0": False}

router = APIRouter()


class _BadParams(ValueError):
    """Connection parameters the contract refuses with an `error` message and close 1003."""


@router.websocket("/api/velma-2-stt-streaming")
async def stt_streaming(ws: WebSocket) -> None:
    await _session(ws, "stt-streaming")


@router.websocket("/api/velma-2-synthetic-voice-detection-streaming")
async def svd_streaming(ws: WebSocket) -> None:
    await _session(ws, "svd-streaming")


@router.websocket("/api/velma-2-pii-phi-redaction-streaming")
async def pii_streaming(ws: WebSocket) -> None:
    await _session(ws, "pii-streaming")


async def _session(ws: WebSocket, model: str) -> None:
    state: EmulatorState = ws.app.state.emulator
    family = state.config.detail_family
    await ws.accept()
    key = ws.query_params.get("api_key")
    org = state.org_for_key(key) if key else None
    if org is None or state.check_access(org, model):
        cls = "auth" if org is None else "not_enabled"
        state.reject(UNKNOWN_ORG if org is None else org.name, model, cls)
        rej = details.stream_rejection(family, model, cls)
        await ws.close(code=rej.code, reason=rej.reason)
        return
    try:
        stream, audio_format = _audio_stream(ws.query_params, model)
        options = _options(ws.query_params, model)
    except _BadParams as exc:
        state.reject(org.name, model, "bad_input")
        await ws.send_json({"type": "error", "error": str(exc)})
        await ws.close(code=1003)
        return
    refused = state.admit(org, model, 0.0)
    if refused is not None:
        rej = details.stream_rejection(family, model, refused)
        await ws.close(code=rej.code, reason=rej.reason)
        return
    session = _Session(ws, state, org.name, model, stream, audio_format, options)
    fault = state.draw_fault()  # streams know the 5xx and the slow kinds of fault
    hang_s = state.config.faults.slow_s if fault == "slow" else 0.0
    try:
        await session.run(inject_fault=fault == "5xx", hang_s=hang_s)
    except WebSocketDisconnect:
        logger.info("client left model=%s org=%s", model, org.name)
    finally:
        session.release(completed=False)


class _Session:
    """One admitted stream: reads frames, emits the model's messages, ends with done."""

    def __init__(self, ws: WebSocket, state: EmulatorState, org: str, model: str,
                 stream: AudioStream, audio_format: str | None,
                 options: TranscriptOptions) -> None:
        self.ws, self.state, self.org, self.model = ws, state, org, model
        self.stream, self.audio_format = stream, audio_format
        self.transcriber = Transcriber(options)
        self.options = options
        self.charged = 0.0
        self.head = b""
        self.svd_blocks: deque[Block] = deque(maxlen=int(SVD_WINDOW_MS / (SVD_STEP_S * 1000)))
        self.frames = 0
        self.last_frame_end = 0
        self.redacted_until = 0
        self.released = False

    def release(self, *, completed: bool, failure: str | None = None) -> None:
        """Give the slot back once, before the final message, so stats are final by then."""
        if not self.released:
            self.released = True
            self.state.release(self.org, self.model, completed=completed, fault=failure)

    async def run(self, *, inject_fault: bool, hang_s: float = 0.0) -> bool:
        """Process frames until the empty text frame; True if `done` was sent."""
        first = True
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return False
            if inject_fault:
                await self._fail("Internal server error", 1011)
                return False
            data, text = message.get("bytes"), message.get("text")
            if data is not None:
                if not await self._audio(data):
                    return False
            elif text == "":
                break
            elif text is not None and first and self.model == "stt-streaming":
                if not await self._first_frame_config(text):
                    return False
            first = False
        if hang_s:
            await asyncio.sleep(hang_s)
        try:
            blocks = self.stream.finish()
        except CorruptAudio:
            await self._bad_audio()
            return False
        await self._blocks(blocks)
        self._charge()
        self.release(completed=True)  # before `done`: a client may reconnect at once
        await self._done()
        await self.ws.close(code=1000)
        return True

    async def _audio(self, data: bytes) -> bool:
        if self.model == "svd-streaming" and len(self.head) < 4:
            self.head += data[: 4 - len(self.head)]
            if len(self.head) >= 4 and not matches_container(self.audio_format or "", self.head):
                await self._fail(MISMATCH, 4002)
                return False
        try:
            blocks = self.stream.feed(data)
        except CorruptAudio:
            await self._bad_audio()
            return False
        self._charge()
        await self._blocks(blocks)
        return True

    async def _first_frame_config(self, text: str) -> bool:
        try:
            config = json.loads(text)
            if not isinstance(config, dict):
                raise ValueError("config must be an object")
            allowed = {"speaker_diarization", "emotion_signal", "accent_signal",
                       "deepfake_signal", "pii_phi_tagging", "partial_results", "language",
                       "custom_terms"}
            if set(config) - allowed:
                raise ValueError("unknown config keys")
            values = {k: v for k, v in config.items() if k not in ("custom_terms", "language")}
            if any(not isinstance(v, bool) for v in values.values()):
                raise ValueError("flags must be booleans")
            if "language" in config:
                values["language"] = _language(config["language"])
        except (ValueError, TypeError):
            await self._fail(details.BAD_CONFIG, 1003)
            return False
        self.options = replace(self.options, **values)
        self.transcriber = Transcriber(self.options)
        return True

    async def _blocks(self, blocks: list[Block]) -> None:
        for block in blocks:
            if self.model == "svd-streaming":
                await self._svd_block(block)
                continue
            utterance = self.transcriber.utterance(block)
            if utterance is None:
                continue
            if self.model == "stt-streaming":
                if self.options.partial_results:
                    partial = self.transcriber.partial(utterance)
                    await self.ws.send_json({"type": "partial_utterance",
                                             "partial_utterance": partial})
                await self.ws.send_json({"type": "utterance", "utterance": utterance})
            else:
                end = utterance["start_ms"] + utterance["duration_ms"]
                window = {"start_ms": self.redacted_until, "duration_ms": end - self.redacted_until}
                await self.ws.send_json({"type": "utterance", "utterance": utterance,
                                         "redacted_audio": window})
                await self.ws.send_bytes(fake_mp3(block.digest, window["duration_ms"]))
                self.redacted_until = end

    async def _svd_block(self, block: Block) -> None:
        self.svd_blocks.append(block)
        if block.index % 2 == 0 and block.duration_ms > 0:  # ends at 0.5 s, 1.5 s, 2.5 s ...
            await self._svd_frame(block.end_ms, block.digest)

    async def _svd_frame(self, end_ms: int, digest: bytes) -> None:
        start = max(0, end_ms - SVD_WINDOW_MS)
        silent = all(b.silent for b in self.svd_blocks if b.end_ms > start)
        frame = svd_frame(start, end_ms, synthetic=is_synthetic(self.stream.head_digest),
                          digest=digest, silent=silent)
        await self.ws.send_json({"type": "frame", "frame": frame})
        self.frames += 1
        self.last_frame_end = end_ms

    async def _done(self) -> None:
        duration_ms = self.stream.duration_ms
        if self.model == "stt-streaming":
            await self.ws.send_json({"type": "done", "duration_ms": duration_ms})
        elif self.model == "svd-streaming":
            if duration_ms > self.last_frame_end and self.svd_blocks:
                await self._svd_frame(duration_ms, self.svd_blocks[-1].digest)
            await self.ws.send_json({"type": "done", "duration_ms": duration_ms,
                                     "frame_count": self.frames})
        else:
            trailing = None
            if duration_ms > self.redacted_until:
                trailing = {"start_ms": self.redacted_until,
                            "duration_ms": duration_ms - self.redacted_until}
            await self.ws.send_json({"type": "done", "duration_ms": duration_ms,
                                     "trailing_redacted_audio": trailing})
            if trailing is not None:
                await self.ws.send_bytes(fake_mp3(self.stream.digest, trailing["duration_ms"]))

    def _charge(self) -> None:
        seconds = self.stream.duration_s
        if seconds > self.charged:
            self.state.charge(self.org, self.model, seconds - self.charged)
            self.charged = seconds

    async def _bad_audio(self) -> None:
        if self.model == "svd-streaming":
            await self._fail(MISMATCH, 4002)
        else:
            await self._fail(INVALID_AUDIO, 1003)

    async def _fail(self, error: str, code: int) -> None:
        self.release(completed=False, failure="fault_5xx" if code == 1011 else "bad_input")
        await self.ws.send_json({"type": "error", "error": error})
        await self.ws.close(code=code)


def _audio_stream(query: Any, model: str) -> tuple[AudioStream, str | None]:
    """Validate audio_format/sample_rate/num_channels; build the matching AudioStream."""
    fmt, rate, channels = (query.get(n) for n in ("audio_format", "sample_rate", "num_channels"))
    block_s = SVD_STEP_S if model == "svd-streaming" else UTTERANCE_BLOCK_S
    if fmt is None:
        if model == "svd-streaming":
            raise _BadParams(SVD_FORMAT_REQUIRED)
        if rate is not None or channels is not None:
            raise _BadParams("sample_rate and num_channels require audio_format to be specified")
        return AudioStream(block_s=block_s, container="auto"), None
    valid = [*RAW_FORMATS, *CONTAINER_FORMATS]
    if model == "svd-streaming":
        valid += SVD_EXTRA_FORMATS
    if fmt not in valid:
        raise _BadParams(f"Invalid audio_format='{fmt}'. Valid values: {valid}")
    if fmt in RAW_FORMATS and (rate is None or channels is None):
        raise _BadParams("Raw audio formats require sample_rate and num_channels query parameters")
    if rate is not None and (not rate.isdigit() or int(rate) not in SAMPLE_RATES):
        raise _BadParams(f"Invalid sample_rate={rate}. Valid values: {list(SAMPLE_RATES)}")
    if channels is not None and (not channels.isdigit() or not 1 <= int(channels) <= 8):
        raise _BadParams(f"Invalid num_channels={channels}. Must be between 1 and 8")
    if fmt in RAW_FORMATS:
        assert rate is not None and channels is not None
        align = int(channels) * raw_sample_width(fmt)
        return AudioStream(block_s=block_s, container="raw",
                           bytes_per_second=float(int(rate) * align), block_align=align), fmt
    return AudioStream(block_s=block_s, container="wav" if fmt == "wav" else "compressed"), fmt


def _options(query: Any, model: str) -> TranscriptOptions:
    values: dict[str, Any] = {}
    names = ["speaker_diarization"]
    if model == "stt-streaming":
        names += ["emotion_signal", "accent_signal", "deepfake_signal", "pii_phi_tagging",
                  "partial_results"]
    for name in names if model != "svd-streaming" else []:
        raw = query.get(name)
        if raw is not None:
            if raw.lower() not in _BOOLS:
                raise _BadParams(details.BAD_CONFIG)
            values[name] = _BOOLS[raw.lower()]
    if "language" in query:
        values["language"] = _language(query["language"])
    if model == "pii-streaming":
        values["redact"] = True
        for name in ("start_redaction_padding_ms", "end_redaction_padding_ms"):
            raw = query.get(name)
            if raw is not None:
                if not raw.isdigit():
                    raise _BadParams(details.BAD_CONFIG)
                values[name] = int(raw)
    return TranscriptOptions(**values)


def _language(value: Any) -> str:
    if not isinstance(value, str) or not LANGUAGE_RE.match(value):
        raise _BadParams(details.invalid_language(str(value)))
    return re.split(r"[-_]", value)[0].lower()
