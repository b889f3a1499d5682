"""The Platform jobs flow end to end: real Prefect, moto S3, the emulator, Parquet read back.

The crash test runs the flow in a child process against the session's Prefect server and
services, SIGKILLs it while it polls, and reruns it here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from pydantic import SecretStr
from typer.testing import CliRunner

from blocks import PlatformCredentials
from flows import platform_jobs
from flows.platform import PlatformJobOptions, PlatformSettings
from modulate import PlatformFlags
from modulate_flows.cli import app
from modulate_flows.samples import speech_wav
from store.location import OutputLocation
from store.tables import config_hash_for
from tasks.platform import PollSettings
from tasks.platform_jobs import JobFileRecord, JobRecord, load_records, save_record
from tasks.s3 import AudioObject, S3Input

ROOT = Path(__file__).resolve().parents[1]
FAST_POLL = PollSettings(initial_interval_s=0.05, max_interval_s=0.2, job_timeout_s=20)
FLAGS = PlatformFlags(emotion_annotation=True, demographics=True, synthetic_voice_detection=True)
CHILD = """
import asyncio, json, sys
from flows.platform import PlatformJobOptions, PlatformSettings, platform_jobs
from tasks.s3 import AudioObject, S3Input
from store.tables import config_hash_for
args = json.loads(sys.argv[1])
asyncio.run(platform_jobs(
    source=S3Input.model_validate(args["source"]),
    options=PlatformJobOptions.model_validate(args["options"]),
    settings=PlatformSettings.model_validate(args["settings"]),
))
"""


@pytest.fixture
def emulator(services) -> Iterator[Callable[..., Any]]:
    """Admin calls to the emulator; the Platform job time goes back to its default after."""
    base = services.emulator_url

    def call(method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{base}/_emulator{path}", json=body)
        response.raise_for_status()
        return response.json()

    yield call
    call("PATCH", "/config", {"platform_job_seconds": 1.0})


def job_seconds(emulator: Callable[..., Any], seconds: float) -> None:
    emulator("PATCH", "/config", {"platform_job_seconds": seconds})


def platform_stats(emulator: Callable[..., Any]) -> dict[str, int]:
    return emulator("GET", "/stats")["platform"]


def wavs(names: list[str], seconds: float = 1.0) -> dict[str, bytes]:
    return {f"in/{name}": speech_wav(seconds, seed=i) for i, name in enumerate(names)}


def options(**kw: Any) -> PlatformJobOptions:
    return PlatformJobOptions(**{"files_per_job": 3, "flags": FLAGS, "poll": FAST_POLL, **kw})


def settings(env) -> PlatformSettings:
    return PlatformSettings(
        platform_credentials_block=env.block, limits_block=env.block, output_block=env.block
    )


async def run(env, **kw: Any) -> State:
    return await platform_jobs(
        source=S3Input(bucket_block=env.block, prefix="in/"),
        options=options(**kw),
        settings=settings(env),
        return_state=True,
    )


def ledger(env) -> pd.DataFrame:
    rows = pd.read_parquet(env.output / "files")
    rows["name"] = rows.source_uri.str.rsplit("/", n=1).str[-1]
    return rows.set_index("name")


def records(env) -> list[JobRecord]:
    location = OutputLocation(root=str(env.output))
    return load_records(location, ledger(env).config_hash.iloc[0])


async def test_multi_file_jobs_complete_with_every_result(org_env, emulator) -> None:
    job_seconds(emulator, 0.2)
    names = [f"call-{i}.wav" for i in range(7)]
    org_env.services.upload(org_env.bucket, wavs(names) | {"in/notes.txt": b"not audio"})
    before = platform_stats(emulator)

    state = await run(org_env)
    assert state.name == "Completed", state.message
    after = platform_stats(emulator)
    assert after["submissions"] - before["submissions"] == 7
    assert after["jobs"] - before["jobs"] == 3  # 3 + 3 + 1 files

    results = pd.read_parquet(org_env.output / "platform_results")
    assert sorted(results.groupby("job_id").size()) == [1, 3, 3]
    assert set(results.status) == {"completed"}
    assert results.transcript_text.str.len().min() > 0
    assert results.emotion_json.notna().all() and results.demographics_json.notna().all()
    assert set(results.synthetic_voice_verdict) <= {"synthetic", "non-synthetic"}
    assert json.loads(results.raw_json.iloc[0])["transcript"]["text"]
    rows = ledger(org_env)
    assert rows.loc[names, "status"].eq("completed").all()
    assert rows.loc["notes.txt", "status"] == "skipped"
    assert set(rows.model) == {"platform"}
    assert all(r.closed and r.status == "completed" for r in records(org_env))

    # A rerun sends nothing and creates no job.
    again = await run(org_env)
    assert again.name == "Completed"
    assert platform_stats(emulator)["submissions"] == after["submissions"]
    assert len(pd.read_parquet(org_env.output / "platform_results")) == 7


async def test_a_failed_job_fails_its_file_and_keeps_the_others(org_env, emulator) -> None:
    job_seconds(emulator, 0.0)
    org_env.services.upload(org_env.bucket, wavs(["a.wav", "b-fail.wav", "c.wav"]))

    state = await run(org_env)
    assert state.name == "Completed with failures"
    rows = ledger(org_env)
    assert rows.loc["b-fail.wav", "status"] == "failed"
    assert "b-fail.wav" in rows.loc["b-fail.wav", "error_detail"]
    assert rows.loc[["a.wav", "c.wav"], "status"].eq("completed").all()
    results = pd.read_parquet(org_env.output / "platform_results").set_index("filename")
    assert results.loc["b-fail.wav", "status"] == "failed"
    [record] = records(org_env)
    assert record.closed and record.status == "failed"

    # A file of a recorded job is never sent again, failed or not.
    before = platform_stats(emulator)["submissions"]
    await run(org_env)
    assert platform_stats(emulator)["submissions"] == before


async def test_poll_timeout_leaves_the_job_open_and_a_rerun_reattaches(org_env, emulator) -> None:
    job_seconds(emulator, 60.0)
    org_env.services.upload(org_env.bucket, wavs(["a.wav", "b.wav"]))
    short = PollSettings(initial_interval_s=0.05, max_interval_s=0.1, job_timeout_s=0.5)

    started = time.monotonic()
    state = await run(org_env, poll=short)
    assert time.monotonic() - started < 15
    assert state.name == "Completed with failures"
    assert "rerun to re-attach" in state.message
    rows = ledger(org_env)
    assert set(rows.status) == {"failed"}
    assert set(rows.error_detail) == {"poll timeout after 0.5 s"}
    [record] = records(org_env)
    assert record.finalized and not record.closed

    job_seconds(emulator, 0.0)
    submissions = platform_stats(emulator)["submissions"]
    state = await run(org_env)
    assert state.name == "Completed", state.message
    summary = await state.aresult()
    assert summary.jobs_reattached == 1 and summary.jobs_submitted == 0
    assert platform_stats(emulator)["submissions"] == submissions
    assert set(ledger(org_env).status) == {"completed"}


async def test_crash_mid_poll_reattaches_without_resubmitting(org_env, emulator) -> None:
    job_seconds(emulator, 60.0)  # the jobs are still processing when the child dies
    org_env.services.upload(org_env.bucket, wavs([f"call-{i}.wav" for i in range(4)]))
    args = {
        "source": S3Input(bucket_block=org_env.block, prefix="in/").model_dump(mode="json"),
        "options": options(files_per_job=2).model_dump(mode="json"),
        "settings": settings(org_env).model_dump(mode="json"),
    }
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }
    polls = platform_stats(emulator)["polls"]
    state_dir = org_env.output / "_state" / "platform_jobs"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (_finalized_jobs(state_dir) == 2 and platform_stats(emulator)["polls"] > polls):
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never recorded its jobs"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    submissions = platform_stats(emulator)["submissions"]
    assert submissions > 0 and not (org_env.output / "files").exists()

    job_seconds(emulator, 0.0)
    state = await run(org_env, files_per_job=2)
    assert state.name == "Completed", state.message
    summary = await state.aresult()
    assert summary.jobs_reattached == 2 and summary.jobs_submitted == 0
    assert platform_stats(emulator)["submissions"] == submissions
    assert len(pd.read_parquet(org_env.output / "platform_results")) == 4
    assert set(ledger(org_env).status) == {"completed"}


def _finalized_jobs(directory: Path) -> int:
    found = 0
    for path in directory.glob("*.json") if directory.exists() else []:
        try:
            found += json.loads(path.read_text())["finalized"]
        except (OSError, ValueError):
            pass  # being replaced
    return found


async def test_five_mb_limit_and_unknown_job(org_env, emulator) -> None:
    job_seconds(emulator, 0.0)
    files = wavs(["ok.wav", "gone.wav"]) | {"in/big.wav": b"RIFF" + bytes(5 * 1024 * 1024)}
    org_env.services.upload(org_env.bucket, files)
    # A job the service does not know (expired, or recorded against another account).
    location = OutputLocation(root=str(org_env.output))
    hash_ = _config_hash()
    gone = org_env.services.s3_client().head_object(Bucket=org_env.bucket, Key="in/gone.wav")
    obj = AudioObject(org_env.bucket, "in/gone.wav", 1, gone["ETag"].strip('"'),
                      gone["LastModified"])
    save_record(location, JobRecord(
        job_id="00000000-dead-4000-8000-000000000000", config_hash=hash_, finalized=True,
        files=[JobFileRecord(file_id=obj.file_id, source_uri=obj.uri, etag=obj.etag,
                             size_bytes=1, date=obj.date, filename="gone.wav", posted=True)],
    ))
    before = platform_stats(emulator)["submissions"]

    state = await run(org_env)
    assert state.name == "Completed with failures"
    assert platform_stats(emulator)["submissions"] - before == 1  # ok.wav only
    rows = ledger(org_env)
    assert rows.loc["big.wav", "status"] == "failed"
    assert rows.loc["big.wav", "error_class"] == "BadInput"
    assert "5 MB limit" in rows.loc["big.wav", "error_detail"]
    assert rows.loc["gone.wav", "status"] == "failed"
    assert "unknown" in rows.loc["gone.wav", "error_detail"]
    assert rows.loc["ok.wav", "status"] == "completed"
    closed = {r.job_id: r.status for r in load_records(location, hash_)}
    assert closed["00000000-dead-4000-8000-000000000000"] == "unknown"


async def test_a_refused_last_file_still_finalizes_the_job(org_env, emulator) -> None:
    job_seconds(emulator, 0.0)
    # In name order the corrupt file is the job's last: the service refuses it (400).
    files = wavs(["a.wav", "b.wav"]) | {"in/z-corrupt.wav": b"RIFX" + bytes(4096)}
    org_env.services.upload(org_env.bucket, files)

    state = await run(org_env)
    assert state.name == "Completed with failures"
    rows = ledger(org_env)
    assert rows.loc["z-corrupt.wav", "status"] == "failed"
    assert rows.loc["z-corrupt.wav", "error_class"] == "BadInput"
    assert list(rows.loc[["a.wav", "b.wav"], "status"]) == ["completed", "completed"]
    (record,) = records(org_env)
    assert record.finalized and record.closed
    results = pd.read_parquet(org_env.output / "platform_results")
    assert sorted(results.filename) == ["a.wav", "b.wav"]


def _config_hash() -> str:
    return config_hash_for({"model": "platform", "flags": FLAGS.model_dump()})


def test_realtime_command_prints_a_redacted_url(prefect_server, services) -> None:
    PlatformCredentials(
        account_uuid="00000000-0000-4000-8000-000000000000",
        api_key=SecretStr("platform-key-org0"),
        base_url=services.emulator_url,
    ).save("platform-realtime-test", overwrite=True)

    result = CliRunner().invoke(
        app, ["platform", "realtime", "--block", "platform-realtime-test", "--emotion"]
    )
    assert result.exit_code == 0, result.output
    url = next(line for line in result.output.splitlines() if "realtime_url" in line)
    assert "/realtime/" in url and "token=***" in url
    job_id = next(line for line in result.output.splitlines() if line.startswith("job_id"))
    status = httpx.get(
        f"{services.emulator_url}/api_service/job_status/{job_id.split()[-1]}",
        headers={"accountuuid": "00000000-0000-4000-8000-000000000000",
                 "apikey": "platform-key-org0"},
    )
    assert status.json()["status"] == "processing"
