"""Send S3 objects through the Velma-2 WebSocket endpoints without holding them in memory.

A `StreamJob` is a batch job (tasks/jobs.py) whose call streams: ranged GETs feed binary
frames (each send awaits the socket, so S3 is read no faster than the service takes it),
events are collected until `done`, and PII's MP3 frames go to S3 as a multipart upload while
they arrive. The chunk machinery of tasks/batch.py (slots, retries, breaker, ledger) is shared;
a batch run routes its files over the 100 MB batch limit here through `route_large_files`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from botocore.exceptions import BotoCoreError, ClientError

from modulate import (
    BadInput,
    Done,
    FrameEvent,
    ModelGate,
    PartialUtterance,
    RedactionMetadata,
    StreamingClient,
    StreamParams,
    SVDFrame,
    SVDResult,
    Transcript,
    Transient,
    Utterance,
    UtteranceEvent,
    mark_admitted,
)
from modulate._constants import BATCH_EXTENSIONS, SVD_EXTENSIONS
from modulate.streaming import RAW_AUDIO_FORMATS, StreamEndpoint
from tasks.batch import RunContext
from tasks.budget import open_budget
from tasks.jobs import (
    BatchJob,
    RedactionJob,
    Rows,
    SyntheticVoiceJob,
    TranscriptionJob,
    redacted_audio_key,
    redaction_rows,
)
from tasks.s3 import (
    FRAME_BYTES,
    MIN_PART_BYTES,
    PART_BYTES,
    AudioObject,
    MultipartUpload,
    iter_object,
    read_head,
)
from tasks.slots import SlotPool

if TYPE_CHECKING:
    from blocks import OrgLimits

__all__ = [
    "StreamJob",
    "StreamResult",
    "StreamRoute",
    "WavLayout",
    "check_params",
    "route_large_files",
    "stream_job_for",
    "wav_layout",
]

HEAD_BYTES = 64 * 1024  # enough for any WAV header we can use
RAW_EXTENSIONS: frozenset[str] = frozenset({"pcm", "raw"})
# Extension -> audio_format for the self-describing formats each endpoint accepts. A file
# of another extension is sent without audio_format (STT and PII detect it themselves).
_CONTAINERS = {"wav", "mp3", "ogg", "flac", "webm", "aac", "aiff", "opus"}
_SVD_CONTAINERS = _CONTAINERS | {"au", "wma", "amr", "mp4", "m4a", "3gp", "3gpp"}
# WAV format tag and bits per sample -> raw audio_format.
_WAV_FORMATS = {
    (1, 8): "u8", (1, 16): "s16le", (1, 24): "s24le", (1, 32): "s32le",
    (3, 32): "f32le", (3, 64): "f64le", (6, 8): "alaw", (7, 8): "mulaw",
}
_SAMPLE_RATES = frozenset({8000, 11025, 16000, 22050, 32000, 44100, 48000, 96000})
# Redaction markers seen across API versions (API_CONTRACT.md 0.2): [REDACTED], [SSN],
# <pii:name></pii:name>, <phi></phi>. Only used to find which utterances were redacted.
_MARKER = re.compile(r"\[[A-Z][A-Z_ ]*\]|<(?:pii|phi)\b")


@dataclass(frozen=True)
class WavLayout:
    """What a WAV header says: the raw format of its samples and where the data chunk lies."""

    audio_format: str
    sample_rate: int
    num_channels: int
    data_start: int
    data_end: int | None  # None: to the end of the object


def wav_layout(head: bytes) -> WavLayout | None:
    """Read a WAV header; None unless it is PCM the raw streaming parameters can describe."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, fmt = 12, None
    while pos + 8 <= len(head):
        chunk_id, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
        if chunk_id == b"fmt " and pos + 8 + 16 <= len(head):
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, pos + 8)
            if tag == 0xFFFE and size >= 26 and pos + 8 + 26 <= len(head):
                tag = struct.unpack_from("<H", head, pos + 8 + 24)[0]  # WAVE_FORMAT_EXTENSIBLE
            fmt = (_WAV_FORMATS.get((tag, bits)), rate, channels)
        elif chunk_id == b"data":
            if fmt is None or fmt[0] is None or fmt[1] not in _SAMPLE_RATES:
                return None
            if not 1 <= fmt[2] <= 8:
                return None
            # Streaming writers put 0 or 0xFFFFFFFF as the size: then the data runs to the end.
            end = None if size in (0, 0xFFFFFFFF) else pos + 8 + size
            return WavLayout(fmt[0], fmt[1], fmt[2], pos + 8, end)
        pos += 8 + size + (size & 1)
    return None


@dataclass(frozen=True)
class StreamResult:
    """What one stream returned; `duration_ms` feeds the ledger like a batch result's."""

    duration_ms: int
    utterances: list[Utterance]
    frames: list[SVDFrame]
    partials: int
    audio_uri: str | None = None
    audio_bytes: int = 0


@dataclass(frozen=True)
class StreamJob:
    """One streaming endpoint with its options: a batch job whose call reads S3 as it sends.

    `ledger_model` is the model partition its rows land in: the streaming model's own name
    for the streaming flows, the batch model's for files a batch run routes here. The run's
    batch client passed to `call` is unused: each stream opens its own connection.
    """

    endpoint: StreamEndpoint
    client: StreamingClient = field(compare=False, repr=False)
    s3_client: Any = field(compare=False, repr=False)
    params: StreamParams = field(default_factory=StreamParams)
    output_bucket: str | None = None  # PII: where the redacted MP3 goes
    output_prefix: str = "redacted/"
    ledger_model: str | None = None
    frame_bytes: int = field(default=FRAME_BYTES, compare=False)
    part_bytes: int = field(default=PART_BYTES, compare=False)
    reads_whole_file: ClassVar[bool] = False

    @property
    def stream_model(self) -> str:
        """The model whose concurrent and monthly limits a stream counts against."""
        return f"{self.endpoint}-streaming"

    @property
    def model(self) -> str:
        return self.ledger_model or self.stream_model

    @property
    def extensions(self) -> frozenset[str]:
        return (SVD_EXTENSIONS if self.endpoint == "svd" else BATCH_EXTENSIONS) | RAW_EXTENSIONS

    def config(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, **self.params.model_dump(mode="json")}

    async def call(self, client: Any, audio: bytes | None, obj: AudioObject) -> StreamResult:
        params, start, end = await self._source(obj)
        frames = iter_object(
            self.s3_client, obj.bucket, obj.key, start=start, end=end,
            frame_bytes=self.frame_bytes,
        )
        writer = None
        if self.endpoint == "pii":
            bucket = self.output_bucket or obj.bucket
            writer = MultipartUpload(
                self.s3_client, bucket, redacted_audio_key(self.output_prefix, obj.key),
                max(self.part_bytes, MIN_PART_BYTES),
            )
        collected = _Collector(writer)
        try:
            async with contextlib.aclosing(self.client.stream(self.endpoint, frames, params)) as s:
                async for event in s:
                    mark_admitted()  # the service took the stream: a success for the gate
                    await collected.add(event)
            uri = await writer.finish() if writer is not None else None
        except (BotoCoreError, ClientError) as exc:
            if writer is not None:
                await writer.abort()
            raise Transient(
                f"{self.stream_model}: S3 failed during the stream ({type(exc).__name__})",
                endpoint=self.stream_model, detail="S3 read or write failed",
            ) from None
        except BaseException:
            if writer is not None:
                await writer.abort()
            raise
        return collected.result(uri)

    async def rows(self, result: StreamResult, obj: AudioObject, key: dict[str, Any]) -> Rows:
        text = " ".join(u.text for u in result.utterances)
        if self.endpoint == "svd":
            svd = SVDResult(frames=result.frames, duration_ms=result.duration_ms)
            return await SyntheticVoiceJob().rows(svd, obj, key)
        if self.endpoint == "stt":
            transcript = Transcript(
                text=text, duration_ms=result.duration_ms, utterances=result.utterances
            )
            return await TranscriptionJob().rows(transcript, obj, key)
        # The stream sends no redaction ranges: the spans of redacted utterances stand in.
        ranges = [(u.start_ms, u.end_ms or u.start_ms) for u in result.utterances
                  if _MARKER.search(u.text)]
        meta = RedactionMetadata(
            text=text, duration_ms=result.duration_ms, utterances=result.utterances,
            redaction_ranges=ranges,
        )
        return redaction_rows(meta, result.audio_uri or "", key)

    async def _source(self, obj: AudioObject) -> tuple[StreamParams, int, int]:
        """The connection parameters for this file and the byte range to send."""
        if obj.size == 0:
            raise BadInput("the file is empty", endpoint=self.stream_model, detail="empty file")
        if self.params.audio_format is not None:  # given by the user: every file is that
            return self.params, 0, obj.size
        extension = obj.filename.rsplit(".", 1)[-1].lower() if "." in obj.filename else ""
        if extension in RAW_EXTENSIONS:
            raise BadInput(
                "raw audio needs the audio_format, sample_rate and num_channels parameters",
                endpoint=self.stream_model, detail="raw audio without its format",
            )
        fmt: str | None = extension
        if extension == "wav":
            head = await asyncio.to_thread(read_head, self.s3_client, obj, HEAD_BYTES)
            layout = wav_layout(head)
            if layout is not None:  # the native path: raw PCM, header stripped
                update = {"audio_format": layout.audio_format, "sample_rate": layout.sample_rate,
                          "num_channels": layout.num_channels}
                end = min(obj.size, layout.data_end or obj.size)
                return self.params.model_copy(update=update), layout.data_start, end
        elif extension not in (_SVD_CONTAINERS if self.endpoint == "svd" else _CONTAINERS):
            fmt = "mp4" if self.endpoint == "svd" and extension == "mov" else None
        return self.params.model_copy(update={"audio_format": fmt}), 0, obj.size


def stream_job_for(job: BatchJob, client: StreamingClient, s3_client: Any) -> StreamJob | None:
    """The streaming counterpart of a batch job, its rows under the batch model; None if none.

    STT custom terms are not sent (the query string cannot carry them).
    """
    if isinstance(job, TranscriptionJob):
        o = job.options
        params = StreamParams(
            speaker_diarization=o.speaker_diarization, emotion_signal=o.emotion_signal,
            accent_signal=o.accent_signal, deepfake_signal=o.deepfake_signal,
            pii_phi_tagging=o.pii_phi_tagging, language=o.language,
        )
        return StreamJob("stt", client, s3_client, params, ledger_model=job.model)
    if isinstance(job, SyntheticVoiceJob):
        return StreamJob("svd", client, s3_client, ledger_model=job.model)
    if isinstance(job, RedactionJob):
        r = job.options
        params = StreamParams(
            speaker_diarization=r.speaker_diarization, language=r.language,
            start_redaction_padding_ms=r.start_redaction_padding_ms,
            end_redaction_padding_ms=r.end_redaction_padding_ms,
        )
        return StreamJob(
            "pii", client, job.s3_client, params, output_bucket=job.output_bucket,
            output_prefix=job.output_prefix, ledger_model=job.model,
        )
    return None


class StreamRoute:
    """A batch run's way to its streaming model, opened when the first large file needs it.

    The routed files share the run's ledger key (batch model and config hash), counters and
    output, and hold slots of the streaming model's own limit with a gate of their own.
    """

    def __init__(
        self, parent: RunContext, job: StreamJob, limits: OrgLimits,
        stack: contextlib.AsyncExitStack,
    ) -> None:
        self.parent, self.job, self.limits, self._stack = parent, job, limits, stack
        self.opened: RunContext | None = None
        self._lock = asyncio.Lock()

    async def context(self) -> RunContext:
        async with self._lock:
            if self.opened is None:
                model, parent = self.job.stream_model, self.parent
                limit = self.limits.for_model(model)
                pool = await self._stack.enter_async_context(
                    SlotPool(self.limits.limit_name(model), fallback_limit=limit.concurrent)
                )
                self.opened = RunContext(
                    job=self.job, config_hash=parent.config_hash, client=parent.client,
                    pool=pool, policy=parent.policy, s3_client=parent.s3_client,
                    reader=parent.reader,
                    gate=ModelGate(model=model, declared=limit.concurrent,
                                   source=parent.gate.source),
                    location=parent.location, flow_run_id=parent.flow_run_id,
                )
                self.opened.rejections = parent.rejections  # one summary for the run
                if parent.budget is not None:  # the stream model's own monthly hours
                    self.opened.budget = await open_budget(
                        self.limits, model, parent.location, now=parent.budget.now
                    )
        return self.opened


@contextlib.asynccontextmanager
async def route_large_files(
    ctx: RunContext, client: StreamingClient, limits: OrgLimits
) -> AsyncIterator[None]:
    """While open, files of `ctx`'s run over the batch limit go to the streaming model."""
    job = stream_job_for(ctx.job, client, ctx.s3_client)
    if job is None:
        yield
        return
    async with contextlib.AsyncExitStack() as stack:
        route = ctx.streaming = StreamRoute(ctx, job, limits, stack)
        try:
            yield
        finally:
            ctx.streaming = None
            if route.opened is not None:
                ctx.calls += route.opened.calls


class _Collector:
    """Keeps what the rows need (utterances, frames); PII audio goes straight to the upload."""

    def __init__(self, writer: MultipartUpload | None) -> None:
        self.writer = writer
        self.utterances: list[Utterance] = []
        self.frames: list[SVDFrame] = []
        self.partials = 0
        self.duration_ms = 0

    async def add(self, event: Any) -> None:
        window = None
        if isinstance(event, PartialUtterance):
            self.partials += 1  # superseded by the final utterance; counted, not stored
        elif isinstance(event, UtteranceEvent):
            self.utterances.append(event.utterance)
            window = event.redacted_audio
        elif isinstance(event, FrameEvent):
            self.frames.append(event.frame)
        elif isinstance(event, Done):
            self.duration_ms = event.duration_ms or 0
            window = event.trailing_redacted_audio
        if window is not None and window.audio and self.writer is not None:
            await self.writer.write(window.audio)

    def result(self, uri: str | None) -> StreamResult:
        size = self.writer.size if self.writer is not None else 0
        return StreamResult(self.duration_ms, self.utterances, self.frames, self.partials,
                            uri, size)


def check_params(params: StreamParams) -> None:
    """Refuse, before any file is listed, a format given without what raw audio needs."""
    fmt = params.audio_format
    if fmt is not None and fmt.lower() in RAW_AUDIO_FORMATS and (
        params.sample_rate is None or params.num_channels is None
    ):
        raise ValueError(f"raw audio_format {fmt!r} needs sample_rate and num_channels")
    if fmt is None and (params.sample_rate is not None or params.num_channels is not None):
        raise ValueError("sample_rate and num_channels need audio_format")
