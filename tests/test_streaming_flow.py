"""The streaming flows and the routing of large batch files, against the emulator on a socket.

Close codes are classified client-side in tests/test_client_emulator.py; here each one is
checked for what it does to a run: 4001/4003 at handshake stop it, 1003/4002 fail one file,
4029/4003 limits are waited out or defer, 1011 is retried then fails the file.
"""

from __future__ import annotations

from typing import Any

import httpx
import pandas as pd
import pytest
from prefect.states import State
from pydantic import SecretStr
from test_batch_flows import fast_retries, good_files, ledger, settings, source  # noqa: F401

from bench.stream_memory import upload_long_wav
from blocks import ModelLimit, ModulateCredentials, OrgLimits
from flows import (
    redact_pii,
    stream_detect_synthetic_voice,
    stream_redact_pii,
    stream_transcribe,
    transcribe,
)
from modulate import StreamingClient, StreamParams
from modulate._constants import MAX_BATCH_BYTES
from modulate_flows.samples import bad_files, speech_wav
from tasks.s3 import AudioObject
from tasks.streaming import StreamJob, wav_layout

pytestmark = pytest.mark.usefixtures("fast_retries")

RAW = StreamParams(audio_format="s16le", sample_rate=16000, num_channels=1)


def utterances(env: Any, model: str) -> pd.DataFrame:
    frame = pd.read_parquet(env.output / "utterances")
    frame = frame[frame.model == model]
    return frame.sort_values(["file_id", "idx"])[["file_id", "idx", "start_ms", "text"]]


async def test_stream_transcribe_gives_the_batch_utterances(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(3, seconds=5.0))
    await transcribe(source=source(org_env), settings=settings(org_env))
    state: State = await stream_transcribe(
        source=source(org_env),
        options=StreamParams(partial_results=True),
        settings=settings(org_env),
        return_state=True,
    )
    assert state.name == "Completed"
    streamed = utterances(org_env, "stt-streaming")
    assert len(streamed) >= 6
    # The same audio bytes give the same utterances, sent whole or streamed as raw PCM.
    assert streamed.reset_index(drop=True).equals(
        utterances(org_env, "stt").reset_index(drop=True)
    )
    assert org_env.stats("stt-streaming")["requests"] == 3


async def test_partial_results_are_counted_not_stored(org_env) -> None:
    org_env.services.upload(org_env.bucket, {"p/call.wav": speech_wav(7.0, seed=5)})
    s3 = org_env.services.s3_client()
    head = s3.head_object(Bucket=org_env.bucket, Key="p/call.wav")
    obj = AudioObject(org_env.bucket, "p/call.wav", head["ContentLength"],
                      head["ETag"].strip('"'), head["LastModified"])
    client = StreamingClient(api_key=SecretStr(f"key-{org_env.org}"),
                             base_url=org_env.services.emulator_url)
    job = StreamJob("stt", client, s3, StreamParams(partial_results=True))
    result = await job.call(None, None, obj)
    assert result.partials == len(result.utterances) == 4  # one per 2 s block, 7 s of audio
    assert result.duration_ms == 7000
    rows = await job.rows(result, obj, {"file_id": "f", "config_hash": "c", "model": "m",
                                        "date": "2026-01-01"})
    assert len(rows["utterances"]) == 4


async def test_stream_svd_wav_header_and_raw_pcm(org_env) -> None:
    wav = speech_wav(6.0, seed=11)
    layout = wav_layout(wav)
    assert layout is not None and (layout.audio_format, layout.sample_rate) == ("s16le", 16000)
    org_env.services.upload(
        org_env.bucket, {"in/a.wav": wav, "in/a.pcm": wav[layout.data_start :]}
    )
    first: State = await stream_detect_synthetic_voice(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert first.name == "Completed with failures"  # the .pcm has no format to go by
    rows = ledger(org_env).set_index("source_uri")
    pcm = rows[rows.index.str.endswith(".pcm")].iloc[0]
    assert pcm.status == "failed" and pcm.error_class == "BadInput"
    assert "sample_rate" in pcm.error_detail

    await stream_detect_synthetic_voice(
        source=source(org_env, pattern="*.pcm"), options=RAW, settings=settings(org_env)
    )
    summary = pd.read_parquet(org_env.output / "detection_summary")
    assert len(summary) == 2 and summary.verdict.nunique() == 1  # same samples, same verdict
    detections = pd.read_parquet(org_env.output / "detections")
    assert detections.groupby("file_id").size().tolist() == summary.frames.tolist()
    assert org_env.stats("svd-streaming")["requests"] == 2


async def test_stream_pii_writes_the_mp3_frames_and_ranges(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(2, seconds=6.0))
    summary = await stream_redact_pii(source=source(org_env), settings=settings(org_env))
    assert summary.files == {"completed": 2}
    redactions = pd.read_parquet(org_env.output / "redactions")
    s3 = org_env.services.s3_client()
    for row in redactions.itertuples():
        assert row.redaction_count >= 1  # every file's first utterance names a person
        bucket, key = row.redacted_audio_uri.removeprefix("s3://").split("/", 1)
        assert key.startswith("redacted/in/") and key.endswith(".redacted.mp3")
        mp3 = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        # Windows cover the whole stream at 4 bytes/ms (32 kbps), each with its ID3 header.
        assert mp3[:3] == b"ID3" and len(mp3) >= 4 * row.duration_ms


@pytest.mark.parametrize(("flow", "code"), [(stream_transcribe, 1003),
                                            (stream_detect_synthetic_voice, 4002)])
async def test_undecodable_audio_fails_only_that_file(org_env, flow, code) -> None:
    files = good_files(2)
    files.update({k.replace("calls/", "in/"): v for k, (v, _) in bad_files().items()})
    org_env.services.upload(org_env.bucket, files)
    state: State = await flow(
        source=source(org_env, pattern="*.wav"), settings=settings(org_env), return_state=True
    )
    assert state.name == "Completed with failures"
    status = ledger(org_env).set_index("source_uri")
    by_name = {uri.rsplit("/", 1)[-1]: row for uri, row in status.iterrows()}
    assert by_name["call-000.wav"].status == by_name["call-001.wav"].status == "completed"
    for name in ("corrupt.wav", "notes.wav", "empty.wav"):
        assert by_name[name].status == "failed" and by_name[name].error_class == "BadInput"
    assert f"close code {code}" in by_name["corrupt.wav"].error_detail


@pytest.fixture
def detail_family(org_env):
    """Switch the emulator's detail strings for one test; back to "2026" after."""
    url = f"{org_env.services.emulator_url}/_emulator/config"

    def switch(family: str) -> None:
        httpx.patch(url, json={"detail_family": family}).raise_for_status()

    yield switch
    switch("2026")


@pytest.mark.parametrize("family", ["2026", "legacy"])
async def test_stream_auth_failure_stops_the_run(org_env, detail_family, family) -> None:
    detail_family(family)  # legacy: 4001; 2026: 4003 "This request is not permitted."
    await ModulateCredentials(
        api_key=SecretStr("wrong-key-canary"), base_url=org_env.services.emulator_url
    ).asave(org_env.block, overwrite=True)
    org_env.services.upload(org_env.bucket, good_files(3))
    state: State = await stream_transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.is_failed()
    # 4003 also means "model not enabled" (API_CONTRACT.md 0.2.5): either message names
    # the credentials block to fix.
    assert f"block {org_env.block!r}" in state.message
    assert "wrong-key-canary" not in state.message
    assert not (org_env.output / "files").exists()


async def test_a_stream_holds_a_slot_of_its_streaming_model(org_env) -> None:
    limits = await OrgLimits.aload(org_env.block)
    limits.models["stt-streaming"] = ModelLimit(concurrent=2)
    await limits.asave(org_env.block, overwrite=True)
    org_env.set_model("stt-streaming", concurrent=2)
    org_env.services.upload(org_env.bucket, good_files(6, seconds=4.0))
    summary = await stream_transcribe(source=source(org_env), settings=settings(org_env))
    assert summary.files == {"completed": 6} and summary.rejections == {}
    assert org_env.stats("stt-streaming")["max_in_flight"] <= 2
    assert org_env.stats("stt")["requests"] == 0


async def test_a_4029_concurrency_close_is_waited_out(org_env, detail_family) -> None:
    # Locally we believe in 4 streams, the service allows 1: handshakes closed with 4029
    # "Concurrent connection limit exceeded." are retried until each file gets its turn.
    detail_family("legacy")
    limits = await OrgLimits.aload(org_env.block)
    limits.models["stt-streaming"] = ModelLimit(concurrent=4)
    await limits.asave(org_env.block, overwrite=True)
    org_env.set_model("stt-streaming", concurrent=1)
    org_env.services.upload(org_env.bucket, good_files(6, seconds=4.0))
    summary = await stream_transcribe(source=source(org_env), settings=settings(org_env))
    assert summary.files == {"completed": 6}
    assert summary.rejections.get("ConcurrencyLimited", 0) >= 1
    assert org_env.stats("stt-streaming")["max_in_flight"] == 1


async def test_streaming_monthly_limit_defers(org_env) -> None:
    org_env.set_model("stt-streaming", monthly_audio_hours=3 / 3600)
    org_env.services.upload(org_env.bucket, good_files(5, seconds=4.0))
    limits = await OrgLimits.aload(org_env.block)
    limits.models["stt-streaming"] = ModelLimit(concurrent=1)
    await limits.asave(org_env.block, overwrite=True)
    state: State = await stream_transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.name == "Deferred"
    counts = ledger(org_env).status.value_counts().to_dict()
    assert counts == {"completed": 1, "deferred_quota": 4}


async def test_a_1011_is_retried_then_fails_the_file(org_env) -> None:
    url = f"{org_env.services.emulator_url}/_emulator/config"
    org_env.services.upload(org_env.bucket, good_files(1))
    httpx.patch(url, json={"faults": {"error_5xx_rate": 1.0}}).raise_for_status()
    try:
        state: State = await stream_transcribe(
            source=source(org_env), settings=settings(org_env), return_state=True
        )
    finally:
        httpx.patch(url, json={"faults": {"error_5xx_rate": 0.0}}).raise_for_status()
    assert state.name == "Completed with failures"
    row = ledger(org_env).iloc[0]
    assert row.error_class == "Transient" and row.attempts > 1


async def test_a_150_mib_batch_file_is_routed_to_streaming(org_env) -> None:
    s3 = org_env.services.s3_client()
    org_env.services.upload(org_env.bucket, good_files(1, prefix="big/"))
    upload_long_wav(s3, org_env.bucket, "big/long.wav", 150 * 1024 * 1024,
                    speech_wav(1.0, seed=3)[44:])
    summary = await transcribe(source=source(org_env, "big/"), settings=settings(org_env))
    assert summary.files == {"completed": 2}
    rows = ledger(org_env).set_index("source_uri")
    big = rows.loc[f"s3://{org_env.bucket}/big/long.wav"]
    # The ledger row stays under the batch model and config: a rerun skips it.
    assert big.model == "stt" and big.size_bytes > MAX_BATCH_BYTES
    assert big.audio_duration_ms == (150 * 1024 * 1024 - 44) // 32
    assert org_env.stats("stt-streaming")["requests"] == 1
    assert org_env.stats("stt")["requests"] == 1
    assert len(utterances(org_env, "stt")) > 2400

    again = await transcribe(source=source(org_env, "big/"), settings=settings(org_env))
    assert again.files == {} and org_env.stats("stt-streaming")["requests"] == 1

    # PII: routed to pii-streaming; its MP3 (~20 MB) goes up in 8 MiB parts as it arrives.
    redacted = await redact_pii(source=source(org_env, "big/long"), settings=settings(org_env))
    assert redacted.files == {"completed": 1}
    head = s3.head_object(Bucket=org_env.bucket, Key="redacted/big/long.redacted.mp3")
    assert head["ETag"].strip('"').endswith("-3")  # three parts: 8 MiB, 8 MiB, the rest
    assert head["ContentLength"] >= 4 * big.audio_duration_ms
