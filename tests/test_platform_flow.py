"""The Platform jobs flow end to end: real Prefect, moto S3, the emulator, Parquet read back.

The flow tests run against each of the emulator's Platform wire variants ("nested", "flat"),
with the Platform Credentials block's `wire` settings the variant needs. The crash test runs
the flow in a child process against the session's Prefect server and services, SIGKILLs it
while it polls, and reruns it here (nested only: it takes ~45 s).
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
from modulate import PlatformFlags, PlatformWire
from modulate_flows.cli import app
from modulate_flows.samples import speech_wav
from store.job_records import (
    STATE_DIR,
    JobFileRecord,
    JobRecord,
    failed_submissions,
    load_open_records,
    save_record,
)
from store.location import OutputLocation
from store.tables import config_hash_for
from tasks.platform import PollSettings
from tasks.s3 import AudioObject, S3Input

ROOT = Path(__file__).resolve().parents[1]
FAST_POLL = PollSettings(initial_interval_s=0.05, max_interval_s=0.2, job_timeout_s=20)
FLAGS = PlatformFlags(emotion_annotation=True, demographics=True, synthetic_voice_detection=True)
# What a user sets in the block's `wire` group for each emulator variant. The job-status
# defaults read both shapes; only the submission values and the finalize field differ.
WIRES = {
    "nested": PlatformWire(),
    "flat": PlatformWire(single_file_type="single", multi_file_type="multi",
                         realtime_type="realtime", finalize_field="finalize"),
}
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
    call("PATCH", "/config", {"platform_job_seconds": 1.0, "platform_wire": "nested"})


@pytest.fixture(params=sorted(WIRES))
async def variant(request, org_env, emulator) -> str:
    """The emulator serves this Platform wire variant; the org's block has its settings."""
    emulator("PATCH", "/config", {"platform_wire": request.param})
    await set_wire(org_env, WIRES[request.param])
    return str(request.param)


async def set_wire(env, wire: PlatformWire) -> None:
    block = await PlatformCredentials.aload(env.block)
    block.wire = wire
    await block.save(env.block, overwrite=True)


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


def records(env, *kinds: str) -> list[JobRecord]:
    """Every job record under `open/`, `failed/` or `closed/` (all three by default)."""
    root = env.output / STATE_DIR
    kinds = kinds or ("open", "failed", "closed")
    paths = sorted(path for kind in kinds for path in root.glob(f"{kind}/*.json"))
    return [JobRecord.model_validate_json(p.read_text()) for p in paths]


async def test_multi_file_jobs_complete_with_every_result(org_env, emulator, variant) -> None:
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
    assert set(results.status) == {"completed" if variant == "nested" else "done"}  # its words
    assert results.transcript_text.str.len().min() > 0
    assert results.emotion_json.notna().all() and results.demographics_json.notna().all()
    assert set(results.synthetic_voice_verdict) <= {"synthetic", "non-synthetic"}
    transcript = json.loads(results.raw_json.iloc[0])["transcript"]
    assert transcript if variant == "flat" else transcript["text"]
    rows = ledger(org_env)
    assert rows.loc[names, "status"].eq("completed").all()
    assert rows.loc["notes.txt", "status"] == "skipped"
    assert set(rows.model) == {"platform"}
    assert all(r.closed and r.status == "completed" for r in records(org_env))
    assert len(records(org_env, "closed")) == 3 and not records(org_env, "open")
    statuses = sorted((org_env.output / STATE_DIR / "status").glob("*.json"))
    assert len(statuses) == 3  # the raw JSON of each job's last status answer

    # A rerun sends nothing and creates no job.
    again = await run(org_env)
    assert again.name == "Completed"
    assert platform_stats(emulator)["submissions"] == after["submissions"]
    assert len(pd.read_parquet(org_env.output / "platform_results")) == 7


async def test_a_failed_job_keeps_its_error_and_reruns_resubmit_a_bounded_number_of_times(
    org_env, emulator, variant
) -> None:
    job_seconds(emulator, 0.0)
    org_env.services.upload(org_env.bucket, wavs(["a.wav", "b-fail.wav", "c.wav"]))

    state = await run(org_env, max_resubmissions=1)
    assert state.name == "Completed with failures"
    rows = ledger(org_env)
    assert rows.loc["b-fail.wav", "status"] == "failed"
    assert "Processing failed for b-fail.wav" in rows.loc["b-fail.wav", "error_detail"]
    # nested: per-file status, the others completed; flat: the failed job lists no files,
    # so all three fail with the service's own text.
    again = ["b-fail.wav"] if variant == "nested" else ["a.wav", "b-fail.wav", "c.wav"]
    assert sorted(rows.index[rows.status == "failed"]) == again
    assert set(rows.loc[rows.status == "failed", "error_class"]) == {"PlatformJobFailed"}
    [record] = records(org_env, "failed")
    assert record.closed and record.status == "failed"
    assert "Processing failed" in record.error

    # A rerun sends the failed job's failed files again, in a new job; once only here.
    before = platform_stats(emulator)["submissions"]
    state = await run(org_env, max_resubmissions=1)
    assert platform_stats(emulator)["submissions"] - before == len(again)
    summary = await state.aresult()
    assert summary.files_resubmitted == len(again) and summary.jobs_submitted == 1
    assert {f.submission for r in records(org_env, "failed") for f in r.files} == {1, 2}
    before = platform_stats(emulator)["submissions"]
    state = await run(org_env, max_resubmissions=1)
    assert platform_stats(emulator)["submissions"] == before
    summary = await state.aresult()
    assert summary.files_not_resubmitted == len(again) and summary.jobs_submitted == 0


async def test_poll_timeout_leaves_the_job_open_and_a_rerun_reattaches(
    org_env, emulator, variant
) -> None:
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
    [record] = records(org_env, "open")
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
    state_dir = org_env.output / STATE_DIR / "open"
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
    closed = {r.job_id: r.status for r in records(org_env, "failed")}
    assert closed["00000000-dead-4000-8000-000000000000"] == "unknown"


async def test_a_refused_last_file_still_finalizes_the_job(org_env, emulator, variant) -> None:
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


async def test_the_same_refusal_in_a_row_stops_the_run_naming_the_wire_setting(
    org_env, emulator
) -> None:
    """Default wire settings against a service that takes other submission_type values."""
    job_seconds(emulator, 0.0)
    emulator("PATCH", "/config", {"platform_wire": "flat"})
    org_env.services.upload(org_env.bucket, wavs([f"call-{i}.wav" for i in range(8)]))
    before = platform_stats(emulator)["submissions"]

    state = await run(org_env, files_per_job=2)
    assert state.is_failed()
    message = state.message or ""
    assert "wire.submission_type_field" in message and org_env.block in message
    assert "3 uploads in a row" in message
    # Stopped after the third identical refusal (the posting jobs run at once: a few more).
    assert platform_stats(emulator)["submissions"] - before < 8

    await set_wire(org_env, WIRES["flat"])
    state = await run(org_env, files_per_job=2)
    assert state.name == "Completed", state.message
    assert set(ledger(org_env).status) == {"completed"}


async def test_an_unreadable_job_status_ends_polling_and_a_fixed_rerun_reattaches(
    org_env, emulator
) -> None:
    job_seconds(emulator, 0.0)
    emulator("PATCH", "/config", {"platform_wire": "flat"})
    await set_wire(org_env, WIRES["flat"].model_copy(update={"status_field": "state"}))
    org_env.services.upload(org_env.bucket, wavs(["a.wav", "b.wav"]))
    slow = PollSettings(initial_interval_s=0.05, max_interval_s=0.1, job_timeout_s=600)

    started = time.monotonic()
    state = await run(org_env, poll=slow)
    assert time.monotonic() - started < 60  # not the 600 s job timeout
    assert state.name == "Completed with failures"
    rows = ledger(org_env)
    assert set(rows.error_class) == {"UnreadableJobStatus"}
    detail = rows.error_detail.iloc[0]
    assert "'state'" in detail and "wire.status_field" in detail and "'status'" in detail
    [record] = records(org_env, "open")
    raw = json.loads((org_env.output / STATE_DIR / "status" / f"{record.job_id}.json").read_text())
    assert raw["status"] == "done"  # the body as it came, kept beside the record

    await set_wire(org_env, WIRES["flat"])
    submissions = platform_stats(emulator)["submissions"]
    state = await run(org_env, poll=slow)
    assert state.name == "Completed", state.message
    assert (await state.aresult()).jobs_reattached == 1
    assert platform_stats(emulator)["submissions"] == submissions
    assert set(ledger(org_env).status) == {"completed"}


def test_reattach_reads_only_open_jobs(tmp_path: Path) -> None:
    """Closed records are never opened at start-up (these ones would not even parse), and
    records of the earlier flat layout move into `open/`, `failed/` or `closed/` once."""
    location = OutputLocation(root=str(tmp_path))
    state = tmp_path / STATE_DIR

    def record(job_id: str, **kw: Any) -> JobRecord:
        f = JobFileRecord(file_id=f"f-{job_id}", source_uri=f"s3://b/{job_id}.wav", etag="e",
                          size_bytes=1, date="2026-12-01", filename=f"{job_id}.wav", posted=True)
        return JobRecord(job_id=job_id, config_hash="h", files=[f], finalized=True, **kw)

    (state / "closed").mkdir(parents=True)
    for i in range(50):
        (state / "closed" / f"done-{i}.json").write_text("not json: must never be read")
    save_record(location, record("open-1"))
    failed = record("failed-1", closed=True, status="failed")
    failed.files[0].outcome = "failed"
    save_record(location, failed)
    (state / "legacy-1.json").write_text(record("legacy-1").model_dump_json())

    assert sorted(r.job_id for r in load_open_records(location, "h")) == ["legacy-1", "open-1"]
    assert not (state / "legacy-1.json").exists()
    assert load_open_records(location, "other-config") == []
    assert failed_submissions(location, "h") == {"f-failed-1": 1}
    done = record("open-1", closed=True, status="completed")
    done.files[0].outcome = "completed"
    save_record(location, done)  # closing moves it out of open/
    assert [r.job_id for r in load_open_records(location, "h")] == ["legacy-1"]


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


async def test_a_rerun_with_max_files_takes_the_next_files(org_env, emulator) -> None:
    """`max_files` counts after the ledger skip, as in the batch flows (issue 12): the second
    run lists the 3 completed objects first, passes over them and sends the next 3."""
    job_seconds(emulator, 0.05)
    names = [f"call-{i}.wav" for i in range(6)]
    org_env.services.upload(org_env.bucket, wavs(names))

    async def limited() -> State:
        return await platform_jobs(
            source=S3Input(bucket_block=org_env.block, prefix="in/", max_files=3),
            options=options(),
            settings=settings(org_env),
            return_state=True,
        )

    before = platform_stats(emulator)
    assert (await limited()).name == "Completed"
    assert (await limited()).name == "Completed"
    assert platform_stats(emulator)["submissions"] - before["submissions"] == 6
    assert ledger(org_env).loc[names, "status"].eq("completed").all()
