"""Routes of the Modulate Platform API: POST /api_service, job status, realtime WebSocket.

The vendor publishes only part of this surface (API_CONTRACT.md §9); every field beyond
`audio_base64`/`file_extension`/`flags`/`filename` and `job_id`/`status` is our choice, kept in
this one module, in two variants switched at runtime (`platform_wire`): "nested" (per-file
status, results under `result`) and "flat" (other submission_type values and finalize field,
flat results with no per-file status, a failed job lists no files). Jobs move processing →
completed (or failed) `platform_job_seconds` after they are finalized; the status is computed
when polled, so the delay can change at runtime.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request, WebSocket
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from emulator import details
from emulator.audio import AudioStream, Block, CorruptAudio
from emulator.batch import RejectedRequest, error_response, serve_admitted
from emulator.content import EMOTIONS, Transcriber, TranscriptOptions, is_synthetic
from emulator.state import UNKNOWN_ORG, EmulatorState, Job, JobFile

__all__ = ["MAX_PLATFORM_BYTES", "router"]

MAX_PLATFORM_BYTES = 5 * 1024 * 1024
EXTENSIONS: tuple[str, ...] = ("mp3", "wav", "opus")
# Per variant: the submission_type value of a single file, a multi-file job, a realtime session.
SUBMISSION_TYPES: dict[str, tuple[str, str, str]] = {
    "nested": ("single_file", "multi_file", "realtime_websocket"),
    "flat": ("single", "multi", "realtime"),
}
FINALIZE_FIELD = {"nested": "finalize_job", "flat": "finalize"}
# The flat variant's job statuses, by the nested one's.
FLAT_STATUS = {"accepting_files": "accepting_files", "processing": "running",
               "completed": "done", "failed": "error"}
FLAGS: tuple[str, ...] = (
    "emotion_annotation", "demographics", "synthetic_voice_detection", "behavioral_insights",
)
ESTIMATED_TIME = "30-60 seconds"
BLOCK_S = 2.0
MODEL = "platform"
REALTIME_BYTES_PER_SECOND = 32_000.0
AGE_RANGES = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")

router = APIRouter()


@router.post("/api_service")
async def submit(request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    state.platform["submissions"] += 1
    org = state.org_for_platform(request.headers.get("accountuuid", ""),
                                 request.headers.get("apikey", ""))
    if org is None:
        state.reject(UNKNOWN_ORG, MODEL, "auth")
        return error_response(401, "Invalid credentials.")
    if state.check_access(org, MODEL):
        state.reject(org.name, MODEL, "not_enabled")
        rej = details.batch_rejection(state.config.detail_family, MODEL, "not_enabled")
        return error_response(rej.status, rej.detail, rej.headers)
    try:
        try:
            body = await request.json()
        except ValueError as exc:
            raise RejectedRequest(400, "Invalid request.") from exc
        if not isinstance(body, dict):
            raise RejectedRequest(400, "Invalid request.")
        plan = _plan(state, org.name, body)
    except RejectedRequest as rej:
        state.reject(org.name, MODEL, rej.cls)
        return error_response(rej.status, rej.detail)
    return await serve_admitted(state, org, MODEL, plan["seconds"],
                                lambda: _accept(state, org.name, request, plan))


@router.get("/api_service/job_status/{job_id}")
async def job_status(job_id: str, request: Request) -> Response:
    state: EmulatorState = request.app.state.emulator
    state.platform["polls"] += 1
    org = state.org_for_platform(request.headers.get("accountuuid", ""),
                                 request.headers.get("apikey", ""))
    if org is None:
        return error_response(401, "Invalid credentials.")
    job = state.jobs.get(job_id)
    if job is None or job.org != org.name:
        return error_response(404, "Job not found.")
    status = state.job_status(job)
    failing = next((f.filename for f in job.files if "fail" in f.filename), None)
    if state.config.platform_wire == "flat":
        return JSONResponse(_flat_status(job, status, failing))
    files = []
    for f in job.files:
        failed = status == "failed" and f.filename == failing
        done = status in ("completed", "failed") and not failed
        files.append({
            "file_id": f.file_id,
            "filename": f.filename,
            "status": "failed" if failed else ("completed" if done else status),
            "result": f.result if done else None,
            "error": f"Processing failed for {f.filename}." if failed else None,
        })
    error = f"Processing failed for {failing}." if status == "failed" else None
    return JSONResponse({"job_id": job.job_id, "status": status, "files": files, "error": error})


def _flat_status(job: Job, status: str, failing: str | None) -> dict[str, Any]:
    """Flat variant: results only once done, no per-file status, transcript a string."""
    results = []
    if status == "completed":
        for f in job.files:
            transcript = f.result["transcript"]
            results.append({"id": f.file_id, "filename": f.filename, **f.result,
                            "transcript": transcript["text"],
                            "utterances": transcript["utterances"]})
    return {
        "job_id": job.job_id,
        "status": FLAT_STATUS[status],
        "results": results,
        "error_message": (f"Processing failed for {failing}; resubmit the job's files."
                          if status == "failed" else None),
    }


@router.websocket("/realtime/{job_id}")
async def realtime(ws: WebSocket, job_id: str) -> None:
    """Realtime job stream: binary audio, "" to end; utterance messages, then done, close 1000."""
    state: EmulatorState = ws.app.state.emulator
    await ws.accept()
    job = state.jobs.get(job_id)
    token = ws.query_params.get("token", "")
    if job is None or job.token is None or not secrets.compare_digest(token, job.token):
        await ws.close(code=4003, reason="This request is not permitted.")
        return
    # Realtime audio is raw s16le 16 kHz mono (our choice), or a WAV stream (detected).
    stream = AudioStream(block_s=BLOCK_S, container="auto",
                         bytes_per_second=REALTIME_BYTES_PER_SECOND, block_align=2)
    blocks: list[Block] = []
    transcriber = Transcriber(TranscriptOptions())
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("bytes") is not None:
                for block in stream.feed(message["bytes"]):
                    blocks.append(block)
                    utterance = transcriber.utterance(block)
                    if utterance is not None:
                        await ws.send_json({"type": "utterance", "utterance": utterance})
            elif message.get("text") == "":
                break
        for block in stream.finish():
            blocks.append(block)
            utterance = transcriber.utterance(block)
            if utterance is not None:
                await ws.send_json({"type": "utterance", "utterance": utterance})
    except (WebSocketDisconnect, CorruptAudio):
        return
    state.charge(job.org, MODEL, stream.duration_s)
    job.files.append(JobFile(str(uuid.uuid4()), "realtime", _result(stream, blocks, {})))
    job.finalized_at = time.monotonic()
    await ws.send_json({"type": "done", "duration_ms": stream.duration_ms})
    await ws.close(code=1000)


def _plan(state: EmulatorState, org: str, body: dict[str, Any]) -> dict[str, Any]:
    """Validate a submission; raise RejectedRequest on bad input.

    The plan's `kind` is the nested variant's name of the submission type, whatever came.
    """
    variant = state.config.platform_wire
    types = SUBMISSION_TYPES[variant]
    sent = body.get("submission_type", types[0])
    if sent not in types:
        expected = ", ".join(types)
        if variant == "nested":
            raise RejectedRequest(400, f"Invalid submission_type. Expected one of: {expected}.")
        allowed = " or ".join(repr(t) for t in types)
        raise RejectedRequest(422, [{"loc": ["body", "submission_type"],
                                     "msg": f"Input should be {allowed}",
                                     "type": "literal_error", "input": sent}])
    kind = SUBMISSION_TYPES["nested"][types.index(sent)]
    flags = body.get("flags") or {}
    if not isinstance(flags, dict) or any(not isinstance(v, bool) for v in flags.values()):
        raise RejectedRequest(400, "Invalid flags.")
    job_id = body.get("job_id")
    if job_id is not None:
        job = state.jobs.get(str(job_id))
        if job is None or job.org != org:
            raise RejectedRequest(404, "Job not found.")
        if job.finalized_at is not None or job.submission_type == "realtime_websocket":
            raise RejectedRequest(409, "Job is already finalized.")
    plan: dict[str, Any] = {"kind": kind, "flags": flags, "job_id": job_id, "seconds": 0.0,
                            "finalize": bool(body.get(FINALIZE_FIELD[variant], False)),
                            "audio": None}
    if kind == "realtime_websocket":
        return plan
    audio_b64 = body.get("audio_base64")
    if audio_b64 is None and job_id is not None and plan["finalize"]:
        return plan  # finalize a multi-file job without a further file
    ext = body.get("file_extension")
    if ext not in EXTENSIONS:
        expected = ", ".join(EXTENSIONS)
        raise RejectedRequest(400, f"Unsupported file_extension. Expected one of: {expected}.")
    if not isinstance(audio_b64, str):
        raise RejectedRequest(400, "Invalid audio_base64.")
    try:
        audio = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RejectedRequest(400, "Invalid audio_base64.") from exc
    if not audio:
        raise RejectedRequest(400, details.EMPTY)
    if len(audio) > MAX_PLATFORM_BYTES:
        raise RejectedRequest(413, "File exceeds the 5 MB limit.")
    stream = AudioStream(block_s=BLOCK_S, container="wav" if ext == "wav" else "compressed")
    try:
        blocks = stream.feed(audio) + stream.finish()
    except CorruptAudio as exc:
        raise RejectedRequest(400, details.CORRUPT) from exc
    filename = body.get("filename")
    plan.update(seconds=stream.duration_s, audio=(stream, blocks),
                filename=filename if isinstance(filename, str) and filename else f"audio.{ext}")
    return plan


def _accept(state: EmulatorState, org: str, request: Request, plan: dict[str, Any]) -> Response:
    """Create or extend the job once the submission is admitted."""
    if plan["job_id"] is not None:
        job = state.jobs[str(plan["job_id"])]
        if job.finalized_at is not None:  # finalized by a concurrent upload meanwhile
            return error_response(409, "Job is already finalized.")
    else:
        job = Job(job_id=str(uuid.uuid4()), org=org, submission_type=plan["kind"])
        state.jobs[job.job_id] = job
    if plan["kind"] == "realtime_websocket":
        job.token = secrets.token_urlsafe(24)
        scheme = "wss" if request.url.scheme == "https" else "ws"
        url = f"{scheme}://{request.url.netloc}/realtime/{job.job_id}?token={job.token}"
        return JSONResponse({"job_id": job.job_id, "status": "processing", "realtime_url": url})
    file_id: str | None = None
    calls = 0
    if plan["audio"] is not None:
        stream, blocks = plan["audio"]
        file_id = str(uuid.uuid4())
        job.files.append(JobFile(file_id, plan["filename"], _result(stream, blocks, plan["flags"])))
        calls = 1 + sum(1 for name in FLAGS if plan["flags"].get(name))
    if job.submission_type != "multi_file" or plan["finalize"]:
        job.finalized_at = time.monotonic()
    return JSONResponse({
        "job_id": job.job_id,
        "file_id": file_id,
        "status": "accepting_files" if job.finalized_at is None else "processing",
        "api_calls_charged": calls,
        "estimated_processing_time": ESTIMATED_TIME,
    })


def _result(stream: AudioStream, blocks: list[Block], flags: dict[str, Any]) -> dict[str, Any]:
    """The per-file result, deterministic in the audio bytes; optional parts follow `flags`."""
    transcriber = Transcriber(TranscriptOptions())
    for block in blocks:
        transcriber.utterance(block)
    utterances = [{k: v for k, v in u.items() if k not in ("emotion", "accent", "deepfake_score")}
                  for u in transcriber.utterances]
    result: dict[str, Any] = {"transcript": {"text": transcriber.text, "utterances": utterances}}
    digest = stream.digest
    if flags.get("emotion_annotation"):
        result["emotion"] = [
            {"start_ms": u["start_ms"], "end_ms": u["start_ms"] + u["duration_ms"],
             "emotion": EMOTIONS[hashlib.sha256(u["utterance_uuid"].encode()).digest()[0]
                                 % len(EMOTIONS)]}
            for u in utterances
        ]
    if flags.get("demographics"):
        result["demographics"] = {"age_range": AGE_RANGES[digest[1] % len(AGE_RANGES)],
                                  "gender": ("female", "male")[digest[2] % 2]}
    if flags.get("synthetic_voice_detection"):
        synthetic = is_synthetic(stream.head_digest)
        result["synthetic_voice"] = {
            "verdict": "synthetic" if synthetic else "non-synthetic",
            "confidence": round(0.6 + 0.4 * digest[3] / 255, 4),
        }
    if flags.get("behavioral_insights"):
        result["behavioral_insights"] = {
            "sentiment": ("positive", "neutral", "negative")[digest[4] % 3],
            "engagement": round(digest[5] / 255, 4),
            "interruptions": digest[6] % 4,
            "speaker_count": len({u["speaker"] for u in utterances}),
        }
    return result
