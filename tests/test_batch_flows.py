"""The batch flows end to end: real Prefect, a moto S3 server, the emulator, Parquet read back."""

from __future__ import annotations

import asyncio

import duckdb
import pandas as pd
import pytest
from prefect.states import State

from blocks import ModelLimit, OrgLimits
from flows import detect_synthetic_voice, redact_pii, transcribe, transcribe_english_fast
from modulate import RetryPolicy
from modulate_flows.samples import bad_files, speech_wav
from tasks import runner
from tasks.runner import RunSettings
from tasks.s3 import S3Input

pytestmark = pytest.mark.usefixtures("fast_retries")


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every wait of the retry policy zero, so tests never sleep (the policy is a value)."""
    monkeypatch.setattr(runner, "DEFAULT_POLICY", RetryPolicy.for_tests())


def good_files(n: int, prefix: str = "in/", seconds: float = 1.0) -> dict[str, bytes]:
    return {f"{prefix}call-{i:03d}.wav": speech_wav(seconds, seed=i) for i in range(n)}


def source(env, prefix: str = "in/", **kw) -> S3Input:
    return S3Input(bucket_block=env.block, prefix=prefix, **kw)


def settings(env, **kw) -> RunSettings:
    return RunSettings(
        credentials_block=env.block, limits_block=env.block, output_block=env.block, **kw
    )


def ledger(env) -> pd.DataFrame:
    return pd.read_parquet(env.output / "files")


async def test_every_status_lands_in_the_ledger(org_env) -> None:
    files = good_files(6)
    files.update({k.replace("calls/", "in/"): v for k, (v, _) in bad_files().items()})
    org_env.services.upload(org_env.bucket, files)

    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env, chunk_size=4), return_state=True
    )
    assert state.name == "Completed with failures"
    rows = ledger(org_env).set_index("source_uri")
    status = {uri.rsplit("/", 1)[-1]: s for uri, s in rows["status"].items()}
    assert status["empty.wav"] == "failed"
    assert status["corrupt.wav"] == "failed"
    assert status["notes.wav"] == "failed"
    assert status["readme.txt"] == "skipped"
    assert status["blip.wav"] == "completed"
    assert [status[f"call-{i:03d}.wav"] for i in range(6)] == ["completed"] * 6
    failed = rows[rows.status == "failed"]
    assert set(failed.error_class) == {"BadInput"}
    assert failed.error_detail.str.len().min() > 10

    svd: State = await detect_synthetic_voice(
        source=source(org_env, pattern="*.wav"), settings=settings(org_env), return_state=True
    )
    svd_rows = ledger(org_env)
    svd_rows = svd_rows[svd_rows.model == "svd"]
    blip = svd_rows[svd_rows.source_uri.str.endswith("blip.wav")].iloc[0]
    assert blip.status == "failed" and "500 ms" in blip.error_detail
    assert svd.name == "Completed with failures"
    assert len(svd_rows) == len(files) - 1  # readme.txt is not matched by *.wav


async def test_two_runs_at_once_hold_the_org_limit(org_env) -> None:
    limits = await OrgLimits.aload(org_env.block)
    limits.models["stt"] = ModelLimit(concurrent=3)
    await limits.asave(org_env.block, overwrite=True)
    await limits.sync()
    org_env.set_model("stt", concurrent=3)
    httpx_patch_latency(org_env, 0.05)
    org_env.services.upload(org_env.bucket, good_files(30, "a/") | good_files(30, "b/"))

    states = await asyncio.gather(
        transcribe(source=source(org_env, "a/"), settings=settings(org_env), return_state=True),
        transcribe(source=source(org_env, "b/"), settings=settings(org_env), return_state=True),
    )
    assert [s.name for s in states] == ["Completed", "Completed"]
    stats = org_env.stats("stt")
    assert stats["max_in_flight"] <= 3
    assert stats["max_in_flight"] == 3  # and the limit was used in full
    assert stats["rejections"].get("concurrency", 0) == 0
    httpx_patch_latency(org_env, 0.0)


def httpx_patch_latency(env, seconds: float) -> None:
    import httpx

    httpx.patch(
        f"{env.services.emulator_url}/_emulator/config", json={"latency": {"mean_s": seconds}}
    ).raise_for_status()


@pytest.mark.parametrize("family", ["2026", "legacy"])
async def test_monthly_limit_defers_then_resumes(org_env, family: str) -> None:
    # Both families of detail strings must open the breaker (DESIGN.md section 2).
    httpx_patch_config(org_env, {"detail_family": family})
    org_env.services.upload(org_env.bucket, good_files(40, seconds=2.0))
    # 2-second files: the month holds 12 of them.
    org_env.set_model("stt", monthly_audio_hours=24 / 3600)

    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env, chunk_size=10), return_state=True
    )
    assert state.name == "Deferred"
    rows = ledger(org_env)
    counts = rows.status.value_counts().to_dict()
    assert counts["completed"] == 12
    assert counts["deferred_quota"] == 28
    stats = org_env.stats("stt")
    # The first refusal, at most C - 1 (= 3) calls sent alongside it, then at most C (= 4)
    # calls sent after it (modulate/gate.py, rule 5).
    assert stats["rejections"]["monthly"] <= 4 + 4

    # A new month, with room for the rest.
    httpx_post(org_env, "/_emulator/usage/reset")
    org_env.set_model("stt", monthly_audio_hours=1.0)
    before = org_env.stats("stt")["requests"]
    state = await transcribe(source=source(org_env), settings=settings(org_env), return_state=True)
    assert state.name == "Completed"
    assert org_env.stats("stt")["requests"] - before == 28  # exactly the deferred files
    assert set(ledger(org_env).status) == {"completed"}
    httpx_patch_config(org_env, {"detail_family": "2026"})


def httpx_patch_config(env, changes: dict) -> None:
    import httpx

    httpx.patch(f"{env.services.emulator_url}/_emulator/config", json=changes).raise_for_status()


def httpx_post(env, path: str) -> None:
    import httpx

    httpx.post(f"{env.services.emulator_url}{path}").raise_for_status()


async def test_rerun_is_idempotent_and_parquet_reads_back(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(9, seconds=3.0))
    first = await transcribe(source=source(org_env), settings=settings(org_env, chunk_size=4))
    requests = org_env.stats("stt")["requests"]
    second = await transcribe(source=source(org_env), settings=settings(org_env, chunk_size=4))
    assert org_env.stats("stt")["requests"] == requests  # zero calls for completed files
    assert first.files == {"completed": 9} and second.files == {}

    root = org_env.output
    con = duckdb.connect()
    for table, key in [
        ("files", "file_id, config_hash"),
        ("transcripts", "file_id, config_hash"),
        ("utterances", "file_id, config_hash, idx"),
    ]:
        total, distinct = con.execute(
            f"select count(*), count(distinct ({key})) from "
            f"read_parquet('{root}/{table}/**/*.parquet', hive_partitioning=true)"
        ).fetchone()
        assert total == distinct > 0, table
    utterances = pd.read_parquet(root / "utterances")
    assert {"file_id", "start_ms", "end_ms", "speaker", "text", "model", "date"} <= set(
        utterances.columns
    )
    assert (utterances.end_ms > utterances.start_ms).all()


async def test_redaction_writes_mp3_and_vfast_transcribes(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(3, seconds=4.0))
    summary = await redact_pii(source=source(org_env), settings=settings(org_env))
    assert summary.files == {"completed": 3}
    redactions = pd.read_parquet(org_env.output / "redactions")
    client = org_env.services.s3_client()
    for uri in redactions.redacted_audio_uri:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read()[:3] == b"ID3"
    # files.output_uri holds the redacted MP3's URI, as docs/data.md says.
    files = ledger(org_env).merge(redactions, on=["file_id", "config_hash"])
    assert len(files) == 3 and (files.output_uri == files.redacted_audio_uri).all()
    fast = await transcribe_english_fast(source=source(org_env), settings=settings(org_env))
    assert fast.files == {"completed": 3}
    transcripts = pd.read_parquet(org_env.output / "transcripts")
    assert set(transcripts.model) == {"pii", "vfast"}


async def test_bad_key_stops_the_run_naming_the_block(org_env) -> None:
    from pydantic import SecretStr

    from blocks import ModulateCredentials

    await ModulateCredentials(
        api_key=SecretStr("wrong-key-canary"), base_url=org_env.services.emulator_url
    ).asave(org_env.block, overwrite=True)
    org_env.services.upload(org_env.bucket, good_files(5))
    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.is_failed()
    assert "Credentials block" in state.message and org_env.block in state.message
    assert "wrong-key-canary" not in state.message
    assert not (org_env.output / "files").exists()  # no file was marked failed


async def test_s3_output_and_artifacts(org_env) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from blocks import ParquetOutput
    from store.fragments import read_table

    org_env.services.upload("parquet-out", {})
    output = ParquetOutput(
        root="s3://parquet-out/tables", aws_credentials=org_env.services.aws_credentials()
    )
    await output.asave(org_env.block, overwrite=True)
    org_env.services.upload(org_env.bucket, good_files(4))
    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.name == "Completed"
    files = read_table(output.location(), "files").to_pandas()
    assert list(files.status) == ["completed"] * 4

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["modulate-stt-summary"])),
        )
        mine = [a for a in artifacts if a.flow_run_id == state.state_details.flow_run_id]
        assert mine and "files completed" in str(mine[0].data)
