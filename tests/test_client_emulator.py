"""The clients against the real emulator on 127.0.0.1: every endpoint's happy path, every
rejection the emulator can produce in both detail families, and no key in exceptions or logs."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import websockets
from pydantic import SecretStr

from emulator import EmulatorConfig, make_wav, run_in_thread
from modulate import (
    AuthError,
    BadInput,
    BatchClient,
    ConcurrencyLimited,
    Done,
    FrameEvent,
    GiveUp,
    ModelNotEnabled,
    ModulateError,
    MonthlyLimitReached,
    PartialUtterance,
    PlatformClient,
    PlatformFlags,
    PlatformWire,
    RedactionOptions,
    RetryPolicy,
    StreamingClient,
    StreamParams,
    STTOptions,
    Transient,
    UnreadableResponse,
    UtteranceEvent,
    decide,
)
from modulate.batch import _multipart

VELMA_KEY = "demo-velma-key"
ACCOUNT = "00000000-0000-4000-8000-000000000000"
PLATFORM_KEY = "demo-platform-key"
WRONG_KEY = "wrong-key-SECRET-4f2a9c"
FAMILIES = ("legacy", "2026")
BATCH = ("stt", "vfast", "svd", "pii")
STREAMS = ("stt", "svd", "pii")

WAV = make_wav(3.0, seed=1)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    config = EmulatorConfig.default()
    config.platform_job_seconds = 0.0
    with run_in_thread(config) as running:
        yield running


@pytest.fixture(autouse=True)
def fresh(emulator: Any) -> Iterator[None]:
    httpx.post(f"{emulator.url}/_emulator/reset").raise_for_status()
    yield


def admin_config(emulator: Any, **changes: Any) -> None:
    httpx.patch(f"{emulator.url}/_emulator/config", json=changes).raise_for_status()


def admin_model(emulator: Any, model: str, **changes: Any) -> None:
    url = f"{emulator.url}/_emulator/orgs/demo/models/{model}"
    httpx.patch(url, json=changes).raise_for_status()


def batch(emulator: Any, key: str = VELMA_KEY) -> BatchClient:
    return BatchClient(api_key=SecretStr(key), base_url=emulator.url)


def streaming(emulator: Any, key: str = VELMA_KEY) -> StreamingClient:
    return StreamingClient(api_key=SecretStr(key), base_url=emulator.url)


# The wire settings each emulator Platform variant needs (the job-status defaults read both).
PLATFORM_WIRES = {
    "nested": PlatformWire(),
    "flat": PlatformWire(single_file_type="single", multi_file_type="multi",
                         realtime_type="realtime", finalize_field="finalize"),
}


def platform(
    emulator: Any, key: str = PLATFORM_KEY, wire: PlatformWire = PLATFORM_WIRES["nested"]
) -> PlatformClient:
    return PlatformClient(
        account_uuid=ACCOUNT, api_key=SecretStr(key), base_url=emulator.url, wire=wire
    )


async def chunks(data: bytes, size: int = 16_000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


STREAM_PARAMS = {
    "stt": StreamParams(partial_results=True),
    "svd": StreamParams(audio_format="wav"),
    "pii": StreamParams(),
}


# --- happy paths -------------------------------------------------------------------------------


async def test_batch_happy_paths(emulator: Any) -> None:
    async with batch(emulator) as client:
        transcript = await client.transcribe(
            WAV, "call.wav", STTOptions(emotion_signal=True, language="en")
        )
        assert transcript.duration_ms == 3000 and transcript.utterances
        assert all(u.end_ms is not None and u.speaker for u in transcript.utterances)
        fast = await client.transcribe_english_fast(WAV, "call.wav")
        assert fast.duration_ms == 3000 and fast.text == transcript.text
        svd = await client.detect_synthetic_voice(WAV, "call.wav")
        assert svd.filename == "call.wav" and svd.frames and svd.duration_ms == 3000
        redaction = await client.redact(WAV, "call.wav", RedactionOptions())
        assert redaction.metadata.duration_ms == 3000 and redaction.audio
        assert all(start < end for start, end in redaction.metadata.redaction_ranges)


async def test_batch_stt_custom_terms(emulator: Any) -> None:
    async with batch(emulator) as client:
        options = STTOptions(custom_terms=["Velma"], speaker_diarization=False)
        assert (await client.transcribe(WAV, "a.wav", options)).duration_ms == 3000


async def test_batch_client_refuses_use_after_close(emulator: Any) -> None:
    client = batch(emulator)
    async with client:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        await client.transcribe_english_fast(WAV, "a.wav")


async def test_batch_shares_a_caller_pool(emulator: Any) -> None:
    async with httpx.AsyncClient() as pool:
        async with BatchClient(
            api_key=SecretStr(VELMA_KEY), base_url=emulator.url, http_client=pool
        ) as client:
            await client.transcribe_english_fast(WAV, "a.wav")
        assert not pool.is_closed  # the caller's pool outlives our client


async def test_stream_stt(emulator: Any) -> None:
    events = await streaming(emulator).collect("stt", chunks(WAV), STREAM_PARAMS["stt"])
    assert isinstance(events[-1], Done) and events[-1].duration_ms == 3000
    assert any(isinstance(e, UtteranceEvent) for e in events)
    assert any(isinstance(e, PartialUtterance) for e in events)


async def test_stream_svd(emulator: Any) -> None:
    events = await streaming(emulator).collect("svd", chunks(WAV), STREAM_PARAMS["svd"])
    done = events[-1]
    frames = [e for e in events if isinstance(e, FrameEvent)]
    assert isinstance(done, Done) and done.frame_count == len(frames) > 0


async def test_stream_svd_raw_pcm(emulator: Any) -> None:
    pcm = WAV[44:]
    params = StreamParams(audio_format="s16le", sample_rate=16000, num_channels=1)
    events = await streaming(emulator).collect("svd", chunks(pcm), params)
    assert isinstance(events[-1], Done)


async def test_stream_pii_attaches_binary_frames(emulator: Any) -> None:
    events = await streaming(emulator).collect("pii", chunks(WAV), STREAM_PARAMS["pii"])
    done = events[-1]
    assert isinstance(done, Done)
    windows = [e.redacted_audio for e in events if isinstance(e, UtteranceEvent)]
    if done.trailing_redacted_audio is not None:
        windows.append(done.trailing_redacted_audio)
    present = [w for w in windows if w is not None]
    assert present and all(w.audio for w in present)


async def test_stream_early_exit_closes_the_socket(emulator: Any) -> None:
    import contextlib

    client = streaming(emulator)
    async with contextlib.aclosing(client.stream("svd", chunks(WAV), STREAM_PARAMS["svd"])) as s:
        async for _event in s:
            break
    for _ in range(50):
        stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
        if stats["orgs"]["demo"]["svd-streaming"]["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert stats["orgs"]["demo"]["svd-streaming"]["in_flight"] == 0


async def test_stream_audio_source_failure_reaches_the_caller(emulator: Any) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield WAV[:32000]
        raise OSError("source broke")

    with pytest.raises(OSError, match="source broke"):
        await streaming(emulator).collect("stt", broken(), StreamParams())


@pytest.mark.parametrize("variant", sorted(PLATFORM_WIRES))
async def test_platform_single_multi_realtime_status(emulator: Any, variant: str) -> None:
    admin_config(emulator, platform_wire=variant)
    flags = PlatformFlags(emotion_annotation=True)
    async with platform(emulator, wire=PLATFORM_WIRES[variant]) as client:
        single = await client.submit_file(WAV, "a.wav", flags=flags)
        assert single.job_id and single.status in ("processing", "accepting_files")
        status = await _until_done(client, single.job_id)
        assert status.outcome == "completed" and status.files[0].result
        assert status.files[0].transcript_text and status.files[0].result["emotion"]
        assert status.raw[{"nested": "files", "flat": "results"}[variant]]

        first = await client.submit_file(WAV, "p1.wav", flags=flags, finalize=False)
        assert first.status == "accepting_files"
        second = await client.submit_file(
            WAV, "p2.wav", flags=flags, job_id=first.job_id, finalize=True
        )
        assert second.job_id == first.job_id
        status = await _until_done(client, first.job_id)
        assert status.outcome == "completed" and len(status.files) == 2

        with pytest.raises(BadInput) as info:  # 409: already finalized
            await client.submit_file(WAV, "p3.wav", flags=flags, job_id=first.job_id)
        assert info.value.status == 409

        session = await client.create_realtime_session(PlatformFlags())
        assert session.job_id and session.realtime_url.startswith("ws://")
        assert "token=" in session.realtime_url and "token=" not in repr(session)
        async with websockets.connect(session.realtime_url, proxy=None) as ws:
            for chunk in (WAV[i : i + 32000] for i in range(0, len(WAV), 32000)):
                await ws.send(chunk)
            await ws.send("")
            messages = [m async for m in ws]
        assert '"done"' in messages[-1]

        with pytest.raises(BadInput) as info:  # 404: unknown job
            await client.job_status("no-such-job")
        assert info.value.status == 404


async def _until_done(client: PlatformClient, job_id: str) -> Any:
    for _ in range(100):
        status = await client.job_status(job_id)
        if status.outcome in ("completed", "failed"):
            return status
        await asyncio.sleep(0.05)
    raise AssertionError("job did not finish")


# --- rejections, both families -------------------------------------------------------------------

Expected = tuple[type[ModulateError], bool | None]  # class, quota_suspect (None: not checked)


def expected_batch(family: str, model: str, scenario: str) -> Expected:
    if scenario in ("auth", "missing"):
        if family != "legacy" and model == "svd" and scenario == "auth":
            return ConcurrencyLimited, True  # 2026 SVD: 403 "This request is not permitted."
        return AuthError, None
    return expected_limit(family, model, scenario)


def expected_stream(family: str, model: str, scenario: str) -> Expected:
    if scenario == "auth":
        if family == "legacy":
            return AuthError, None
        return ConcurrencyLimited, True  # 2026: 4003 "This request is not permitted."
    return expected_limit(family, model, scenario)


def expected_limit(family: str, model: str, scenario: str) -> Expected:
    """Model disabled, month used up, no free slot: the same class over HTTP and WebSocket."""
    legacy = family == "legacy"
    if scenario == "not_enabled":
        # 2026: a bare 403/4003, which also means a used-up limit: the run's gate decides.
        return (ModelNotEnabled, None) if legacy else (ConcurrencyLimited, True)
    if scenario == "monthly":
        return (MonthlyLimitReached, None) if legacy else (ConcurrencyLimited, True)
    if scenario == "concurrency":
        return ConcurrencyLimited, not legacy
    raise AssertionError(scenario)


def limit_scenario(emulator: Any, model: str, scenario: str) -> None:
    if scenario == "not_enabled":
        admin_model(emulator, model, enabled=False)
    elif scenario == "monthly":
        admin_model(emulator, model, monthly_audio_hours=0)
    elif scenario == "concurrency":
        admin_model(emulator, model, concurrent=0)


def check(error: ModulateError, expected: Expected) -> None:
    cls, suspect = expected
    assert type(error) is cls, f"{type(error).__name__} != {cls.__name__}: {error}"
    if suspect is not None:
        assert isinstance(error, ConcurrencyLimited) and error.quota_suspect is suspect


async def call_batch(client: BatchClient, model: str, audio: bytes = WAV) -> Any:
    if model == "stt":
        return await client.transcribe(audio, "a.wav")
    if model == "vfast":
        return await client.transcribe_english_fast(audio, "a.wav")
    if model == "svd":
        return await client.detect_synthetic_voice(audio, "a.wav")
    return await client.redact(audio, "a.wav")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", BATCH)
@pytest.mark.parametrize("scenario", ["auth", "missing", "not_enabled", "monthly", "concurrency"])
async def test_batch_rejections(emulator: Any, family: str, model: str, scenario: str) -> None:
    admin_config(emulator, detail_family=family)
    limit_scenario(emulator, model, scenario)
    async with batch(emulator, WRONG_KEY if scenario == "auth" else VELMA_KEY) as client:
        with pytest.raises(ModulateError) as info:
            if scenario == "missing":  # the client never sends an empty key: drop the header
                request = _multipart(model, emulator.url, SecretStr("x"), WAV, "a.wav", {})
                del request.headers["X-API-Key"]
                await client._send(model, request, lambda r: r)
            else:
                await call_batch(client, model)
    check(info.value, expected_batch(family, model, scenario))
    assert info.value.endpoint == model and info.value.status is not None
    if family == "legacy" and scenario == "concurrency":
        assert info.value.retry_after == 1.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", BATCH)
async def test_batch_server_bad_input(emulator: Any, family: str, model: str) -> None:
    admin_config(emulator, detail_family=family)
    async with batch(emulator) as client:
        with pytest.raises(BadInput) as info:
            await call_batch(client, model, b"\x01\x02 not audio at all " * 50)
    assert info.value.status == 400


@pytest.mark.parametrize("model", ["stt", "pii"])
async def test_batch_invalid_language(emulator: Any, model: str) -> None:
    async with batch(emulator) as client:
        with pytest.raises(BadInput, match="language"):
            if model == "stt":
                await client.transcribe(WAV, "a.wav", STTOptions(language="english"))
            else:
                await client.redact(WAV, "a.wav", RedactionOptions(language="english"))


async def test_batch_svd_too_short_on_the_server(emulator: Any) -> None:
    short = make_wav(0.2, seed=3)
    async with batch(emulator) as client:
        request = _multipart("svd", emulator.url, SecretStr(VELMA_KEY), short, "a.wav", {})
        with pytest.raises(BadInput) as info:
            await client._send("svd", request, lambda r: r)
    assert info.value.status == 422


@pytest.mark.parametrize("fault", ["error_5xx_rate", "drop_rate"])
@pytest.mark.parametrize("model", BATCH)
async def test_batch_faults_are_transient(emulator: Any, fault: str, model: str) -> None:
    admin_config(emulator, faults={fault: 1.0})
    async with batch(emulator) as client:
        with pytest.raises(Transient):
            await call_batch(client, model)


async def test_a_connection_closed_before_any_answer_is_not_called_a_timeout() -> None:
    """The ledger's error_detail says what happened: the service closed the connection."""

    async def close_after_the_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(close_after_the_head, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server, BatchClient(api_key=SecretStr(VELMA_KEY), base_url=url) as client:
        with pytest.raises(Transient) as info:
            await call_batch(client, "stt")
    assert "disconnected" in info.value.detail and "Timeout" not in info.value.detail


@pytest.mark.parametrize("model", BATCH)
async def test_a_garbled_2xx_is_unreadable_not_transient(emulator: Any, model: str) -> None:
    admin_config(emulator, faults={"garbled_rate": 1.0})
    async with batch(emulator) as client:
        with pytest.raises(UnreadableResponse) as info:
            await call_batch(client, model)
    assert "unreadable response (HTTP 200" in str(info.value) and "bytes" in str(info.value)
    assert decide(RetryPolicy.for_tests(), info.value, 1, 0.0) == GiveUp(
        "UnreadableResponse is not retried"
    )


async def stream_error(
    emulator: Any, model: str, key: str, params: StreamParams, audio: bytes
) -> ModulateError:
    with pytest.raises(ModulateError) as info:
        await streaming(emulator, key).collect(model, chunks(audio), params)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model", STREAMS)
@pytest.mark.parametrize("scenario", ["auth", "not_enabled", "monthly", "concurrency"])
async def test_stream_rejections(emulator: Any, family: str, model: str, scenario: str) -> None:
    admin_config(emulator, detail_family=family)
    limit_scenario(emulator, f"{model}-streaming", scenario)
    key = WRONG_KEY if scenario == "auth" else VELMA_KEY
    error = await stream_error(emulator, model, key, STREAM_PARAMS[model], WAV)
    check(error, expected_stream(family, model, scenario))
    assert error.endpoint == f"{model}-streaming" and error.close_code is not None


@pytest.mark.parametrize("model", STREAMS)
async def test_stream_bad_params_are_bad_input(emulator: Any, model: str) -> None:
    params = StreamParams(audio_format="wav", language="not a language!")
    if model == "svd":  # SVD takes no language: use a format the server does not know
        params = StreamParams(audio_format="xyz")
    error = await stream_error(emulator, model, VELMA_KEY, params, WAV)
    assert type(error) is BadInput and error.close_code == 1003


@pytest.mark.parametrize("model", STREAMS)
async def test_stream_undecodable_audio_is_bad_input(emulator: Any, model: str) -> None:
    params = StreamParams(audio_format="wav")  # a WAV stream must start with a RIFF header
    error = await stream_error(emulator, model, VELMA_KEY, params, b"\x00garbage" * 4000)
    assert type(error) is BadInput
    assert error.close_code == (4002 if model == "svd" else 1003)


@pytest.mark.parametrize("model", STREAMS)
async def test_stream_fault_is_transient(emulator: Any, model: str) -> None:
    admin_config(emulator, faults={"error_5xx_rate": 1.0})
    error = await stream_error(emulator, model, VELMA_KEY, STREAM_PARAMS[model], WAV)
    assert type(error) is Transient and error.close_code == 1011


async def test_stream_connection_refused_is_transient() -> None:
    client = StreamingClient(api_key=SecretStr(VELMA_KEY), base_url="http://127.0.0.1:9")
    with pytest.raises(Transient):
        await client.collect("stt", chunks(WAV), StreamParams())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scenario", ["auth", "not_enabled", "monthly", "concurrency"])
async def test_platform_rejections(emulator: Any, family: str, scenario: str) -> None:
    admin_config(emulator, detail_family=family)
    limit_scenario(emulator, "platform", scenario)
    expected: Expected = {
        "auth": (AuthError, None),
        "not_enabled": (
            (ModelNotEnabled, None) if family == "legacy" else (ConcurrencyLimited, True)
        ),
        "monthly": (
            (MonthlyLimitReached, None) if family == "legacy" else (ConcurrencyLimited, True)
        ),
        "concurrency": (ConcurrencyLimited, family == "2026"),
    }[scenario]
    async with platform(emulator, WRONG_KEY if scenario == "auth" else PLATFORM_KEY) as client:
        with pytest.raises(ModulateError) as info:
            await client.submit_file(WAV, "a.wav", flags=PlatformFlags())
    check(info.value, expected)
    assert info.value.endpoint == "platform"


async def test_platform_bad_audio_and_fault(emulator: Any) -> None:
    async with platform(emulator) as client:
        with pytest.raises(BadInput):
            await client.submit_file(b"\x00 not audio " * 20, "a.wav", flags=PlatformFlags())
        admin_config(emulator, faults={"error_5xx_rate": 1.0})
        with pytest.raises(Transient):
            await client.submit_file(WAV, "a.wav", flags=PlatformFlags())


# --- overall timeouts: a service that holds the connection and says nothing ---------------------

HANG = {"faults": {"slow_rate": 1.0, "slow_s": 30.0}}


async def test_a_hung_batch_call_ends_at_its_deadline_as_transient(emulator: Any) -> None:
    admin_config(emulator, **HANG)
    client = BatchClient(api_key=SecretStr(VELMA_KEY), base_url=emulator.url, deadline=0.5)
    started = time.monotonic()
    async with client:
        with pytest.raises(Transient, match="no complete answer within 0.5 s"):
            await client.transcribe(WAV, "a.wav")
    assert time.monotonic() - started < 10  # bounded: the emulator would hold it 30 s


async def test_a_silent_stream_ends_at_its_silence_timeout_as_transient(emulator: Any) -> None:
    admin_config(emulator, **HANG)
    client = StreamingClient(
        api_key=SecretStr(VELMA_KEY), base_url=emulator.url, silence_timeout=0.5
    )
    started = time.monotonic()
    with pytest.raises(Transient, match="no message from the service for 0.5 s"):
        await client.collect("svd", chunks(WAV), STREAM_PARAMS["svd"])
    assert time.monotonic() - started < 10


# --- no key in exceptions or logs ----------------------------------------------------------------


def exception_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(vars(exc))


async def test_no_key_in_exceptions_or_logs(
    emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    failures: list[BaseException] = []
    async with batch(emulator, WRONG_KEY) as client:
        for model in BATCH:
            with pytest.raises(ModulateError) as info:
                await call_batch(client, model)
            failures.append(info.value)
    for model in STREAMS:
        with pytest.raises(ModulateError) as info:
            await streaming(emulator, WRONG_KEY).collect(model, chunks(WAV), STREAM_PARAMS[model])
        failures.append(info.value)
    with pytest.raises(Transient) as info:  # connection refused: the URL is in hand
        await StreamingClient(api_key=SecretStr(WRONG_KEY), base_url="http://127.0.0.1:9").collect(
            "stt", chunks(WAV), StreamParams()
        )
    failures.append(info.value)
    async with platform(emulator, WRONG_KEY) as client:
        with pytest.raises(AuthError) as info:
            await client.submit_file(WAV, "a.wav", flags=PlatformFlags())
        failures.append(info.value)
    # and successes, where websockets logs the request line at DEBUG
    for model in STREAMS:
        await streaming(emulator).collect(model, chunks(WAV), STREAM_PARAMS[model])
    async with platform(emulator) as client:
        session = await client.create_realtime_session(PlatformFlags())
    token = session.realtime_url.split("token=", 1)[1]

    assert len(failures) == 9
    for exc in failures:
        text = exception_text(exc)
        assert WRONG_KEY not in text and VELMA_KEY not in text and PLATFORM_KEY not in text
    assert caplog.records, "expected DEBUG records (httpx, websockets)"
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for secret in (WRONG_KEY, VELMA_KEY, PLATFORM_KEY, token):
        assert secret not in logged
    assert any("api_key=***" in r.getMessage() for r in caplog.records)
