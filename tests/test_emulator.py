"""Tests of the Modulate emulator over real sockets: batch, streaming, Platform, admin, limits."""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from emulator import EmulatorConfig, RunningEmulator, make_wav, run_in_thread
from emulator.audio import declared_wav

KEY = "demo-velma-key"
PLATFORM_HEADERS = {"accountuuid": "00000000-0000-4000-8000-000000000000",
                    "apikey": "demo-platform-key"}
STT = "/api/velma-2-stt-batch"
VFAST = "/api/velma-2-stt-batch-english-vfast"
SVD = "/api/velma-2-synthetic-voice-detection-batch"
PII = "/api/velma-2-pii-phi-redaction-batch"
BATCH_PATHS = {"stt": STT, "vfast": VFAST, "svd": SVD, "pii": PII}
STT_WS = "/api/velma-2-stt-streaming"
SVD_WS = "/api/velma-2-synthetic-voice-detection-streaming"
PII_WS = "/api/velma-2-pii-phi-redaction-streaming"
RAW = "audio_format=s16le&sample_rate=16000&num_channels=1"
WAV5 = make_wav(5.0, seed=1)
PCM5 = WAV5[44:]  # stdlib wave writes a plain 44-byte header


@pytest.fixture(scope="module")
def emu() -> Iterator[RunningEmulator]:
    with run_in_thread(EmulatorConfig.default()) as running:
        yield running


@pytest.fixture
async def client(emu: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    emu.state.reset()
    async with httpx.AsyncClient(base_url=emu.url, timeout=30.0) as c:
        yield c


def wav_file(data: bytes = WAV5, name: str = "call.wav") -> dict[str, Any]:
    return {"upload_file": (name, data, "audio/wav")}


async def post(client: httpx.AsyncClient, path: str, data: bytes = WAV5, name: str = "call.wav",
               key: str | None = KEY, **fields: str) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return await client.post(path, headers=headers, files=wav_file(data, name), data=fields)


def parse_multipart(response: httpx.Response) -> dict[str, bytes]:
    head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.content)
    parts: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = str(part.get_param("name", header="content-disposition"))
        parts[name] = bytes(part.get_payload(decode=True))
    return parts


async def closed(ws: ClientConnection) -> tuple[int, str]:
    """Read until the server closes; the close code and reason it sent."""
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def stream(emu: RunningEmulator, path: str, query: str, audio: bytes,
                 chunk: int = 3200) -> tuple[list[Any], int]:
    """Send `audio` then "", collect the messages (JSON decoded, binary kept) and close code."""
    messages: list[Any] = []
    async with connect(f"{emu.ws_url}{path}?api_key={KEY}&{query}", max_size=None) as ws:
        for i in range(0, len(audio), chunk):
            await ws.send(audio[i : i + chunk])
        await ws.send("")
        try:
            async for msg in ws:
                messages.append(json.loads(msg) if isinstance(msg, str) else msg)
        finally:
            assert ws.close_code is not None
    return messages, ws.close_code


async def wait_idle(emu: RunningEmulator, deadline_s: float = 5.0) -> None:
    """Wait until no request is in flight anywhere (bounded by a deadline)."""
    deadline = time.monotonic() + deadline_s
    while any(m["in_flight"] for org in emu.state.stats()["orgs"].values() for m in org.values()):
        assert time.monotonic() < deadline, "emulator still busy"
        await asyncio.sleep(0.01)


# --- batch happy paths ------------------------------------------------------------------------

async def test_stt_batch_shape_and_flags(client: httpx.AsyncClient) -> None:
    r = await post(client, STT, speaker_diarization="true", emotion_signal="true")
    assert r.status_code == 200
    body = r.json()
    assert body["duration_ms"] == 5000 and body["text"]
    assert len(body["utterances"]) == 3
    for u in body["utterances"]:
        assert set(u) == {"utterance_uuid", "text", "start_ms", "duration_ms", "speaker",
                          "language", "emotion", "accent", "deepfake_score"}
        assert u["emotion"] and u["accent"] is None and u["language"] == "en"
    assert [u["speaker"] for u in body["utterances"]] == [1, 2, 1]
    # config JSON overrides the form fields
    cfg = json.dumps({"emotion_signal": False, "accent_signal": True, "language": "fr-CA"})
    body2 = (await post(client, STT, emotion_signal="true", config=cfg)).json()
    assert all(u["emotion"] is None and u["accent"] for u in body2["utterances"])
    assert body2["utterances"][0]["language"] == "fr"


async def test_vfast_svd_pii_batch(client: httpx.AsyncClient) -> None:
    r = await post(client, VFAST)
    assert r.status_code == 200 and set(r.json()) == {"text", "duration_ms"}
    wav10 = make_wav(10.0, seed=2)
    r = await post(client, SVD, data=wav10, name="rec.wav")
    body = r.json()
    assert body["filename"] == "rec.wav" and body["duration_ms"] == 10000
    assert [(f["start_time_ms"], f["end_time_ms"]) for f in body["frames"]] == [
        (0, 4000), (4000, 8000), (8000, 10000)]
    assert {f["verdict"] for f in body["frames"]} <= {"synthetic", "non-synthetic", "no-content"}
    r = await post(client, PII)
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/form-data")
    parts = parse_multipart(r)
    meta = json.loads(parts["metadata"])
    assert set(meta) == {"text", "duration_ms", "utterances", "redaction_ranges"}
    assert "<pii:name></pii:name>" in meta["utterances"][0]["text"]
    assert len(meta["redaction_ranges"]) == 1 and len(meta["redaction_ranges"][0]) == 2
    assert parts["audio"].startswith(b"ID3") and len(parts["audio"]) > 5000 * 4


async def test_transcripts_are_deterministic(client: httpx.AsyncClient) -> None:
    a1 = (await post(client, STT)).json()
    a2 = (await post(client, STT, data=make_wav(5.0, seed=1))).json()
    b = (await post(client, STT, data=make_wav(5.0, seed=99))).json()
    assert a1 == a2
    assert a1["text"] != b["text"]


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "data", "name", "fields", "status", "detail"), [
    (STT, b"", "a.wav", {}, 400, "The uploaded file is empty."),
    (STT, WAV5, "a.txt", {}, 400, "Unsupported file format. Supported formats: .aac, .aiff, "
     ".flac, .mov, .mp3, .mp4, .ogg, .opus, .wav, .webm."),
    (VFAST, b"\x00" * 1000, "a.wav", {}, 400,
     "The audio could not be processed. It may be corrupted or in an unsupported format."),
    (PII, b"hello, this is not audio\n" * 20, "a.mp3", {}, 400,
     "The audio could not be processed. It may be corrupted or in an unsupported format."),
    (SVD, make_wav(0.3, seed=3), "a.wav", {}, 422, "The audio is too short to analyze."),
    (STT, WAV5, "a.wav", {"language": "english!"}, 400,
     "Invalid language='english!'. Expected an ISO 639-1 language code (e.g. 'en', 'fr')."),
    (STT, WAV5, "a.wav", {"config": "{not json"}, 400, "Invalid configuration."),
])
async def test_bad_input(client: httpx.AsyncClient, emu: RunningEmulator, path: str, data: bytes,
                         name: str, fields: dict[str, str], status: int, detail: str) -> None:
    r = await post(client, path, data=data, name=name, **fields)
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    model = next(m for m, p in BATCH_PATHS.items() if p == path)
    stats = emu.state.stats()["orgs"]["demo"][model]
    assert stats["rejections"]["bad_input"] == 1 and stats["audio_seconds"] == 0


async def test_over_100_mb_is_413(client: httpx.AsyncClient) -> None:
    r = await post(client, VFAST, data=b"\x01" * (100 * 1024 * 1024 + 1), name="big.mp3")
    assert r.status_code == 413


# --- auth and limits, both detail families -----------------------------------------------------

MISSING_2026 = [{"loc": ["header", "X-API-Key"], "msg": "Field required", "type": "missing"}]
NOT_PERMITTED = "This request is not permitted."
BATCH_CASES = [  # (family, model, case, status, detail)
    ("legacy", "stt", "missing", 401, "Missing API key."),
    ("legacy", "stt", "invalid", 401, "Invalid API key."),
    ("legacy", "stt", "not_enabled", 403, "Model access not enabled for this organization."),
    ("legacy", "stt", "monthly", 403, "Monthly usage limit reached."),
    ("legacy", "stt", "concurrency", 429, "Concurrent request limit exceeded."),
    ("legacy", "svd", "invalid", 403, "Invalid API key."),
    ("legacy", "svd", "monthly", 403, "Monthly usage limit reached."),
    ("legacy", "svd", "concurrency", 403, "Concurrent request limit exceeded."),
    ("2026", "stt", "missing", 422, MISSING_2026),
    ("2026", "pii", "invalid", 401, "Invalid API key."),
    ("2026", "vfast", "not_enabled", 403, NOT_PERMITTED),
    ("2026", "stt", "monthly", 429, "Insufficient credits."),
    ("2026", "pii", "concurrency", 429, "Insufficient credits."),
    ("2026", "svd", "invalid", 403, NOT_PERMITTED),
    ("2026", "svd", "monthly", 403, NOT_PERMITTED),
    ("2026", "svd", "concurrency", 403, NOT_PERMITTED),
]


def limit(emu: RunningEmulator, model: str, case: str) -> str | None:
    """Set up `case` for `model`; return the key to send."""
    if case == "not_enabled":
        emu.state.patch_model("demo", model, {"enabled": False})
    elif case == "monthly":
        emu.state.patch_model("demo", model, {"monthly_audio_hours": 0})
    elif case == "concurrency":
        emu.state.patch_model("demo", model, {"concurrent": 0})
    return {"missing": None, "invalid": "wrong-key"}.get(case, KEY)


@pytest.mark.parametrize(("family", "model", "case", "status", "detail"), BATCH_CASES)
async def test_batch_rejections(client: httpx.AsyncClient, emu: RunningEmulator, family: str,
                                model: str, case: str, status: int, detail: Any) -> None:
    r = await client.patch("/_emulator/config", json={"detail_family": family})
    assert r.status_code == 200
    key = limit(emu, model, case)
    r = await post(client, BATCH_PATHS[model], key=key)
    assert (r.status_code, r.json()) == (status, {"detail": detail})
    retry_after = family == "legacy" and case == "concurrency"
    assert ("retry-after" in r.headers) == retry_after


async def test_concurrency_rejects_at_once(client: httpx.AsyncClient,
                                           emu: RunningEmulator) -> None:
    emu.state.patch_model("demo", "vfast", {"concurrent": 2})
    emu.state.patch_config({"latency": {"mean_s": 0.3}})
    start = time.monotonic()
    responses = await asyncio.gather(*(post(client, VFAST) for _ in range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429, 429, 429]
    assert all(r.elapsed.total_seconds() < 0.25 for r in responses if r.status_code == 429)
    assert time.monotonic() - start >= 0.3
    stats = (await client.get("/_emulator/stats")).json()["orgs"]["demo"]["vfast"]
    assert stats["max_in_flight"] == 2 and stats["in_flight"] == 0
    assert stats["rejections"]["concurrency"] == 3 and stats["completed"] == 2


async def test_monthly_limit_and_usage_reset(client: httpx.AsyncClient,
                                             emu: RunningEmulator) -> None:
    r = await client.patch("/_emulator/orgs/demo/models/stt",
                           json={"monthly_audio_hours": 10 / 3600})
    assert r.json()["monthly_audio_hours"] == pytest.approx(10 / 3600)
    assert [(await post(client, STT)).status_code for _ in range(3)] == [200, 200, 429]
    stats = emu.state.stats()["orgs"]["demo"]["stt"]
    assert stats["audio_seconds"] == 10.0 and stats["rejections"]["monthly"] == 1
    await client.post("/_emulator/stats/reset")
    assert emu.state.stats()["orgs"]["demo"]["stt"]["audio_seconds"] == 10.0
    await client.post("/_emulator/usage/reset")
    assert (await post(client, STT)).status_code == 200


async def test_latency_per_audio_second_and_header_duration(
    client: httpx.AsyncClient, emu: RunningEmulator
) -> None:
    """A sparse WAV counts as its real body until the emulator trusts headers; the latency
    grows with the duration it counts."""
    hour_in_4_kb = declared_wav(3600.0, PCM5[:4000])
    emu.state.patch_config({"latency": {"per_audio_s": 0.3 / 3600}})
    short = await post(client, VFAST, hour_in_4_kb)
    assert short.json()["duration_ms"] == 125  # 4,000 bytes at 32,000 bytes/s
    emu.state.config.wav_duration_from_header = True
    start = time.monotonic()
    long = await post(client, VFAST, hour_in_4_kb)
    assert long.json()["duration_ms"] == 3_600_000
    assert time.monotonic() - start >= 0.3
    stats = emu.state.stats()["orgs"]["demo"]["vfast"]
    assert stats["audio_seconds"] == pytest.approx(3600.125)


# --- faults -------------------------------------------------------------------------------------

async def test_fault_5xx_and_drop_and_slow(client: httpx.AsyncClient,
                                           emu: RunningEmulator) -> None:
    emu.state.patch_config({"faults": {"error_5xx_rate": 1.0}})
    for path in (STT, VFAST):
        r = await post(client, path)
        assert r.status_code in (500, 502, 503, 504) and isinstance(r.json()["detail"], str)
    emu.state.patch_config({"faults": {"error_5xx_rate": 0.0, "drop_rate": 1.0}})
    with pytest.raises(httpx.RemoteProtocolError):
        await post(client, SVD)
    emu.state.patch_config({"faults": {"drop_rate": 0.0, "slow_rate": 1.0, "slow_s": 0.5}})
    with pytest.raises(httpx.ReadTimeout):
        await client.post(STT, headers={"X-API-Key": KEY}, files=wav_file(), timeout=0.1)
    await wait_idle(emu)  # the slow call still holds its slot after the client gave up
    rejections = emu.state.stats()["orgs"]["demo"]
    assert rejections["stt"]["rejections"]["slow"] == 1
    assert rejections["stt"]["rejections"]["fault_5xx"] == 1
    assert rejections["svd"]["rejections"]["dropped"] == 1
    assert rejections["svd"]["in_flight"] == 0


# --- streaming ----------------------------------------------------------------------------------

async def test_stt_streaming_matches_batch(client: httpx.AsyncClient,
                                           emu: RunningEmulator) -> None:
    batch = (await post(client, STT)).json()
    messages, code = await stream(emu, STT_WS, f"{RAW}&partial_results=true", PCM5)
    assert code == 1000 and messages[-1] == {"type": "done", "duration_ms": 5000}
    kinds = [m["type"] for m in messages]
    assert kinds == ["partial_utterance", "utterance"] * 3 + ["done"]
    assert [m["utterance"] for m in messages if m["type"] == "utterance"] == batch["utterances"]
    wav_messages, _ = await stream(emu, STT_WS, "", WAV5, chunk=7000)  # auto-detected WAV
    assert [m for m in wav_messages if m["type"] == "utterance"] == [
        m for m in messages if m["type"] == "utterance"]
    stats = emu.state.stats()["orgs"]["demo"]["stt-streaming"]
    assert stats["completed"] == 2 and stats["audio_seconds"] == 10.0


async def test_svd_streaming_frames(emu: RunningEmulator, client: httpx.AsyncClient) -> None:
    messages, code = await stream(emu, SVD_WS, RAW, PCM5)
    frames = [(m["frame"]["start_time_ms"], m["frame"]["end_time_ms"]) for m in messages[:-1]]
    assert frames == [(0, 500), (0, 1500), (0, 2500), (0, 3500), (500, 4500), (1000, 5000)]
    assert messages[-1] == {"type": "done", "duration_ms": 5000, "frame_count": 6}
    assert code == 1000


async def test_pii_streaming_pairs(emu: RunningEmulator, client: httpx.AsyncClient) -> None:
    messages, code = await stream(emu, PII_WS, RAW, PCM5)
    assert code == 1000
    assert [type(m).__name__ for m in messages] == ["dict", "bytes"] * 4
    utterances = [m for m in messages if isinstance(m, dict) and m["type"] == "utterance"]
    assert "<pii:name></pii:name>" in utterances[0]["utterance"]["text"]
    assert utterances[0]["redacted_audio"]["start_ms"] == 0
    done = messages[-2]
    trailing = done["trailing_redacted_audio"]
    assert done["type"] == "done" and trailing["start_ms"] + trailing["duration_ms"] == 5000
    assert all(m.startswith(b"ID3") for m in messages if isinstance(m, bytes))


STREAM_CASES = [  # (family, path, model, case, code, reason)
    ("legacy", STT_WS, "stt-streaming", "invalid", 4001, "Invalid API key"),
    ("legacy", STT_WS, "stt-streaming", "not_enabled", 4003,
     "Model access not enabled for this organization."),
    ("legacy", PII_WS, "pii-streaming", "monthly", 4029, "Monthly usage limit reached."),
    ("legacy", STT_WS, "stt-streaming", "concurrency", 4029,
     "Concurrent connection limit exceeded."),
    ("legacy", SVD_WS, "svd-streaming", "concurrency", 4003,
     "Concurrent connection limit exceeded."),
    ("2026", STT_WS, "stt-streaming", "invalid", 4003, NOT_PERMITTED),
    ("2026", PII_WS, "pii-streaming", "not_enabled", 4003, NOT_PERMITTED),
    ("2026", STT_WS, "stt-streaming", "concurrency", 4029, "Insufficient credits."),
    ("2026", SVD_WS, "svd-streaming", "monthly", 4003, "Insufficient credits."),
]


@pytest.mark.parametrize(("family", "path", "model", "case", "code", "reason"), STREAM_CASES)
async def test_stream_rejections(client: httpx.AsyncClient, emu: RunningEmulator, family: str,
                                 path: str, model: str, case: str, code: int,
                                 reason: str) -> None:
    emu.state.patch_config({"detail_family": family})
    key = limit(emu, model, case)
    async with connect(f"{emu.ws_url}{path}?api_key={key}&{RAW}") as ws:
        assert await closed(ws) == (code, reason)


@pytest.mark.parametrize(("path", "query", "error", "code"), [
    (STT_WS, "audio_format=mp4", "Invalid audio_format='mp4'. Valid values: [", 1003),
    (PII_WS, "audio_format=s16le", "Raw audio formats require sample_rate and num_channels "
     "query parameters", 1003),
    (STT_WS, "sample_rate=16000&num_channels=1",
     "sample_rate and num_channels require audio_format to be specified", 1003),
    (STT_WS, "audio_format=s16le&sample_rate=50000&num_channels=1",
     "Invalid sample_rate=50000. Valid values: [8000, ", 1003),
    (SVD_WS, "audio_format=s16le&sample_rate=16000&num_channels=12",
     "Invalid num_channels=12. Must be between 1 and 8", 1003),
    (SVD_WS, "", "audio_format query parameter is required. Example: audio_format=s16le"
     "&sample_rate=16000&num_channels=1", 1003),
])
async def test_stream_bad_params(client: httpx.AsyncClient, emu: RunningEmulator, path: str,
                                 query: str, error: str, code: int) -> None:
    async with connect(f"{emu.ws_url}{path}?api_key={KEY}&{query}") as ws:
        message = json.loads(await ws.recv())
        assert message["type"] == "error" and message["error"].startswith(error)
        assert (await closed(ws))[0] == code


async def test_svd_stream_format_mismatch(client: httpx.AsyncClient,
                                          emu: RunningEmulator) -> None:
    async with connect(f"{emu.ws_url}{SVD_WS}?api_key={KEY}&audio_format=wav") as ws:
        await ws.send(PCM5[:3200])
        message = json.loads(await ws.recv())
        assert message == {"type": "error",
                           "error": "Audio data does not match the declared audio_format."}
        assert (await closed(ws))[0] == 4002


async def test_stream_holds_slot_and_fault(client: httpx.AsyncClient,
                                           emu: RunningEmulator) -> None:
    emu.state.patch_model("demo", "stt-streaming", {"concurrent": 1})
    async with connect(f"{emu.ws_url}{STT_WS}?api_key={KEY}&{RAW}") as first:
        await first.send(PCM5[:64000])  # 2 s: the first utterance proves admission
        assert json.loads(await first.recv())["type"] == "utterance"
        async with connect(f"{emu.ws_url}{STT_WS}?api_key={KEY}&{RAW}") as second:
            assert (await closed(second))[0] == 4029
        assert emu.state.stats()["orgs"]["demo"]["stt-streaming"]["in_flight"] == 1
    emu.state.patch_config({"faults": {"error_5xx_rate": 1.0}})
    async with connect(f"{emu.ws_url}{STT_WS}?api_key={KEY}&{RAW}") as ws:
        await ws.send(PCM5[:3200])
        assert json.loads(await ws.recv()) == {"type": "error", "error": "Internal server error"}
        assert (await closed(ws))[0] == 1011
    stats = emu.state.stats()["orgs"]["demo"]["stt-streaming"]
    assert stats["rejections"]["fault_5xx"] == 1 and stats["in_flight"] == 0


async def test_large_stream_is_incremental(client: httpx.AsyncClient,
                                           emu: RunningEmulator) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB, not silent
    size = 150 * len(chunk)
    async with connect(f"{emu.ws_url}{SVD_WS}?api_key={KEY}&{RAW}", max_size=None) as ws:
        async def reader() -> dict[str, Any]:
            async for msg in ws:
                data = json.loads(msg)
                if data["type"] == "done":
                    return data  # type: ignore[no-any-return]
            raise AssertionError("no done")
        task = asyncio.create_task(reader())
        for _ in range(150):
            await ws.send(chunk)
        await ws.send("")
        done = await task
    assert done["duration_ms"] == size * 1000 // 32000


# --- platform -----------------------------------------------------------------------------------

def platform_body(data: bytes = WAV5, **extra: Any) -> dict[str, Any]:
    return {"audio_base64": base64.b64encode(data).decode(), "file_extension": "wav",
            "filename": "call.wav", "flags": {}, **extra}


async def wait_status(client: httpx.AsyncClient, job_id: str, *wanted: str) -> dict[str, Any]:
    """Poll until the job reaches one of `wanted` (bounded by a deadline)."""
    deadline = time.monotonic() + 5.0
    while True:
        r = await client.get(f"/api_service/job_status/{job_id}", headers=PLATFORM_HEADERS)
        body: dict[str, Any] = r.json()
        if body["status"] in wanted or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.02)


async def test_platform_single_file(client: httpx.AsyncClient, emu: RunningEmulator) -> None:
    emu.state.patch_config({"platform_job_seconds": 0.05})
    flags = {"emotion_annotation": True, "demographics": True,
             "synthetic_voice_detection": True, "behavioral_insights": True}
    r = await client.post("/api_service", headers=PLATFORM_HEADERS,
                          json=platform_body(flags=flags, submission_type="single_file"))
    sub = r.json()
    assert r.status_code == 200 and sub["status"] == "processing"
    assert sub["api_calls_charged"] == 5 and sub["estimated_processing_time"]
    body = await wait_status(client, sub["job_id"], "completed")
    assert body["status"] == "completed" and body["error"] is None
    (file,) = body["files"]
    assert file["file_id"] == sub["file_id"] and file["status"] == "completed"
    assert set(file["result"]) == {"transcript", "emotion", "demographics", "synthetic_voice",
                                   "behavioral_insights"}
    assert file["result"]["transcript"]["text"] == (await post(client, STT)).json()["text"]
    assert emu.state.stats()["platform"]["submissions"] == 1


async def test_platform_multi_file_and_errors(client: httpx.AsyncClient,
                                              emu: RunningEmulator) -> None:
    emu.state.patch_config({"platform_job_seconds": 1e9})  # never finishes
    h = PLATFORM_HEADERS
    first = (await client.post("/api_service", headers=h,
                               json=platform_body(submission_type="multi_file"))).json()
    assert first["status"] == "accepting_files"
    job = first["job_id"]
    assert (await wait_status(client, job, "accepting_files"))["status"] == "accepting_files"
    last = await client.post("/api_service", headers=h, json=platform_body(
        submission_type="multi_file", job_id=job, finalize_job=True, filename="b.wav"))
    assert last.json()["status"] == "processing"
    status = (await client.get(f"/api_service/job_status/{job}", headers=h)).json()
    assert status["status"] == "processing" and len(status["files"]) == 2
    again = await client.post("/api_service", headers=h, json=platform_body(job_id=job))
    assert (again.status_code, again.json()) == (409, {"detail": "Job is already finalized."})
    r = await client.post("/api_service", headers=h, json=platform_body(job_id="nope"))
    assert (r.status_code, r.json()) == (404, {"detail": "Job not found."})
    r = await client.get("/api_service/job_status/nope", headers=h)
    assert r.status_code == 404
    r = await client.post("/api_service", headers=h,
                          json=platform_body(data=b"\x01" * (5 * 1024 * 1024 + 1)))
    assert (r.status_code, r.json()) == (413, {"detail": "File exceeds the 5 MB limit."})
    r = await client.post("/api_service", headers={**h, "apikey": "bad"}, json=platform_body())
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid credentials."})
    r = await client.post("/api_service", headers=h, json={**platform_body(),
                                                           "file_extension": "flac"})
    assert r.status_code == 400
    emu.state.patch_config({"platform_job_seconds": 0.0})
    failing = (await client.post("/api_service", headers=h,
                                 json=platform_body(filename="will-fail.wav"))).json()
    body = await wait_status(client, failing["job_id"], "failed", "completed")
    assert body["status"] == "failed" and body["error"] == "Processing failed for will-fail.wav."
    assert body["files"][0]["status"] == "failed" and body["files"][0]["result"] is None
    assert emu.state.stats()["platform"]["polls"] >= 4


async def test_platform_flat_wire_variant(client: httpx.AsyncClient,
                                          emu: RunningEmulator) -> None:
    emu.state.patch_config({"platform_wire": "flat", "platform_job_seconds": 0.0})
    h = PLATFORM_HEADERS
    r = await client.post("/api_service", headers=h,
                          json=platform_body(submission_type="multi_file"))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "submission_type"]
    first = (await client.post("/api_service", headers=h,
                               json=platform_body(submission_type="multi"))).json()
    assert first["status"] == "accepting_files"
    await client.post("/api_service", headers=h, json=platform_body(
        submission_type="multi", job_id=first["job_id"], finalize=True, filename="b.wav"))
    body = await wait_status(client, first["job_id"], "done")
    assert body["status"] == "done" and body["error_message"] is None
    assert [set(f) >= {"id", "filename", "transcript"} for f in body["results"]] == [True, True]
    assert all(isinstance(f["transcript"], str) and "status" not in f for f in body["results"])
    failing = (await client.post("/api_service", headers=h,
                                 json=platform_body(filename="will-fail.wav"))).json()
    body = await wait_status(client, failing["job_id"], "error")
    assert body["results"] == [] and "resubmit" in body["error_message"]


async def test_platform_realtime(client: httpx.AsyncClient, emu: RunningEmulator) -> None:
    emu.state.patch_config({"platform_job_seconds": 0.0})
    r = await client.post("/api_service", headers=PLATFORM_HEADERS,
                          json={"submission_type": "realtime_websocket"})
    sub = r.json()
    assert sub["status"] == "processing"
    assert sub["realtime_url"].startswith(f"ws://127.0.0.1:{emu.port}/realtime/{sub['job_id']}")
    async with connect(sub["realtime_url"].replace("token=", "token=x")) as ws:
        assert (await closed(ws))[0] == 4003
    async with connect(sub["realtime_url"]) as ws:
        await ws.send(PCM5)
        await ws.send("")
        messages = [json.loads(m) async for m in ws]
    assert messages[-1] == {"type": "done", "duration_ms": 5000}
    body = await wait_status(client, sub["job_id"], "completed")
    assert body["status"] == "completed" and body["files"][0]["result"]["transcript"]["text"]


# --- admin --------------------------------------------------------------------------------------

async def test_admin_routes(client: httpx.AsyncClient, emu: RunningEmulator) -> None:
    r = await client.patch("/_emulator/config", json={"detail_family": "bogus"})
    assert r.status_code == 400
    r = await client.patch("/_emulator/orgs/demo/models/nope", json={"enabled": False})
    assert r.status_code == 404
    r = await client.patch("/_emulator/orgs/demo/models/svd", json={"concurrent": 7})
    assert r.json() == {"enabled": True, "concurrent": 7, "monthly_audio_hours": 1000.0}
    await post(client, SVD)
    stats = (await client.get("/_emulator/stats")).json()
    assert stats["orgs"]["demo"]["svd"]["completed"] == 1
    assert set(stats["orgs"]["demo"]["svd"]["rejections"]) == {
        "concurrency", "monthly", "auth", "not_enabled", "bad_input", "fault_5xx", "dropped",
        "slow", "garbled"}
    await client.post("/_emulator/stats/reset")
    stats = (await client.get("/_emulator/stats")).json()
    assert stats["orgs"]["demo"]["svd"]["completed"] == 0
    assert stats["orgs"]["demo"]["svd"]["audio_seconds"] == 5.0


def test_config_load_and_port(tmp_path: Any) -> None:
    path = tmp_path / "emu.json"
    config = EmulatorConfig.default().model_copy(update={"detail_family": "legacy"})
    path.write_text(config.model_dump_json())
    loaded = EmulatorConfig.load(path)
    assert loaded.detail_family == "legacy" and loaded.orgs[0].velma_keys == [KEY]
    with run_in_thread(loaded) as running:
        assert running.port > 0 and running.url == f"http://127.0.0.1:{running.port}"
        r = httpx.post(f"{running.url}{STT}", files=wav_file())
        assert r.status_code == 401 and r.json() == {"detail": "Missing API key."}
