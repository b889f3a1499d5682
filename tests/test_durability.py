"""A call is paid for once: faults at the output and in answers, overlapping runs, max_files.

Faults are injected at real boundaries: the output directory replaced by a file mid-run, the
emulator's garbled-200 switch, two OS processes running flows on one prefix. The emulator's
counters say how many calls were sent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.states import State
from test_batch_flows import fast_retries, good_files, ledger, settings, source  # noqa: F401
from test_reliability import ROOT, WAIT_S, assert_one_row_per_file, child_env

from flows import transcribe
from store import OutputLocation
from tasks.claims import Claims

pytestmark = pytest.mark.usefixtures("fast_retries")


async def test_an_output_that_stays_unwritable_stops_the_run_naming_the_block(
    org_env, emulator
) -> None:
    files, concurrent = 60, 4
    org_env.services.upload(org_env.bucket, good_files(files))
    emulator("PATCH", "/config", {"latency": {"mean_s": 0.2}})  # about 3 s of calls
    table = org_env.output / "utterances"
    moved = org_env.output / "utterances.moved"
    run = transcribe(source=source(org_env), settings=settings(org_env, chunk_size=10),
                     return_state=True)
    task = asyncio.ensure_future(run)
    deadline = time.monotonic() + WAIT_S
    while not (org_env.output / "files").exists():
        assert not task.done() and time.monotonic() < deadline, "nothing was written"
        await asyncio.sleep(0.02)
    # A file where the utterances directory was: every later write of that table fails.
    table.rename(moved)
    table.write_text("in the way")
    state: State = await task
    assert state.is_failed()
    assert f"Modulate Parquet Output block {org_env.block!r}" in state.message, state.message
    assert "could not write the utterances table" in state.message, state.message
    assert "a rerun sends only the files not written" in state.message
    assert org_env.stats("stt")["requests"] < files  # the run stopped

    table.unlink()
    moved.rename(table)
    emulator("PATCH", "/config", {"latency": {"mean_s": 0.0}})
    state = await transcribe(source=source(org_env), settings=settings(org_env),
                             return_state=True)
    assert state.name == "Completed", state.message
    assert assert_one_row_per_file(org_env.output) == files
    # What the stopped run had paid for and not written: at most 3C (the writer's bound).
    assert org_env.stats("stt")["requests"] - files <= 3 * concurrent


async def test_a_2xx_that_cannot_be_read_fails_the_file_and_is_never_sent_again(
    org_env, emulator
) -> None:
    org_env.services.upload(org_env.bucket, good_files(5))
    emulator("PATCH", "/config", {"faults": {"garbled_rate": 1.0}})
    try:
        state: State = await transcribe(
            source=source(org_env), settings=settings(org_env), return_state=True
        )
    finally:
        emulator("PATCH", "/config", {"faults": {"garbled_rate": 0.0}})
    assert state.name == "Completed with failures", state.message
    rows = ledger(org_env)
    assert set(rows.status) == {"failed"} and set(rows.error_class) == {"UnreadableResponse"}
    assert rows.error_detail.str.contains("unreadable response").all()
    assert rows.error_detail.str.contains("bytes, content type application/json").all()
    assert set(rows.attempts) == {1}
    stats = org_env.stats("stt")
    assert stats["requests"] == stats["completed"] == 5  # billed once each, never re-sent
    assert stats["rejections"]["garbled"] == 5


async def test_max_files_counts_after_the_ledger_skip(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(8))
    done = []
    for _ in range(4):
        summary = await transcribe(source=source(org_env, max_files=3), settings=settings(org_env))
        done.append(summary.files.get("completed", 0))
    assert done == [3, 3, 2, 0]  # the next three each time, not the same three forever
    assert org_env.stats("stt")["requests"] == 8


OVERLAP_CHILD = """
import asyncio, json, pathlib, sys, time
from flows import transcribe
from store import OutputLocation
from tasks.claims import Claims
from tasks.runner import RunSettings
from tasks.s3 import S3Input
args = json.loads(sys.argv[1])
print("ready", flush=True)
go = pathlib.Path(args["go"])
deadline = time.monotonic() + 60
while not go.exists():  # both processes start their runs together
    assert time.monotonic() < deadline, "never told to go"
    time.sleep(0.01)
summary = asyncio.run(transcribe(source=S3Input.model_validate(args["source"]),
                                 settings=RunSettings.model_validate(args["settings"])))
print(json.dumps(summary.files), flush=True)
"""


async def test_two_processes_over_one_prefix_send_each_file_once(
    org_env, emulator, tmp_path: Path
) -> None:
    files = 80
    # Each run holds its declared 4 locally (no Prefect limit synced: slot negotiation between
    # runs is tests/test_batch_flows.py's subject); the service takes both runs' 8.
    org_env.set_model("stt", concurrent=8)
    org_env.services.upload(org_env.bucket, good_files(files))
    # Slow calls until both runs are calling (more than one run's 4 in flight), then fast:
    # the overlap is a condition the test waits for, not a hope about start-up times.
    emulator("PATCH", "/config", {"latency": {"mean_s": 2.0}})
    go = tmp_path / "go"
    args = json.dumps({
        "go": str(go),
        "source": source(org_env).model_dump(mode="json"),
        "settings": settings(org_env, chunk_size=10, claim_lease_seconds=10).model_dump(
            mode="json"),
    })
    children = [
        subprocess.Popen([sys.executable, "-c", OVERLAP_CHILD, args], cwd=ROOT, env=child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
        go.touch()
        deadline = time.monotonic() + WAIT_S
        while org_env.stats("stt")["in_flight"] <= 4:
            assert time.monotonic() < deadline, "the two runs never called at the same time"
            assert all(child.poll() is None for child in children), "a run ended early"
            time.sleep(0.05)
        emulator("PATCH", "/config", {"latency": {"mean_s": 0.02}})
        outputs = [child.communicate(timeout=WAIT_S) for child in children]
    finally:
        for child in children:
            child.kill()
    summaries = []
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err[-2000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    stats = org_env.stats("stt")
    assert stats["requests"] == stats["completed"] == files  # each sent once between the runs
    done = [s.get("completed", 0) for s in summaries]
    assert sum(done) == files and min(done) > 0, summaries  # both worked, at the same time
    assert assert_one_row_per_file(org_env.output) == files
    assert set(ledger(org_env).status) == {"completed"}
    assert not list((org_env.output / "_state" / "claims").rglob("*.json"))  # tidied


async def test_a_run_on_s3_removes_its_claims_a_thousand_per_request(services) -> None:
    """The end of a run removes its claims; on S3 one DELETE per claim took 10,000 requests
    after a run of 10,000 files. A batch delete takes at most 1,000 keys."""
    bucket = "claims-sweep"
    client = services.s3_client()
    client.create_bucket(Bucket=bucket)
    location = OutputLocation(
        root=f"s3://{bucket}/out", s3_endpoint_url=services.s3_endpoint,
        aws_access_key_id="testing", aws_secret_access_key="testing", region="us-east-1",
    )
    file_ids = [f"f{i:04d}" for i in range(1001)]
    sent: list[str] = []
    async with Claims(location, "velma-2-stt-batch", "cfg", "run-1") as claims:
        acquired = await asyncio.to_thread(claims.acquire, file_ids)
        assert sorted(acquired.mine) == file_ids
        # botocore's own event at the wire: which S3 operations the sweep sends.
        claims.store.client.meta.events.register(
            "before-call.s3", lambda model, **_: sent.append(model.name)
        )
    left = client.list_objects_v2(Bucket=bucket, Prefix="out/_state/claims/").get("KeyCount")
    assert left == 0
    assert sent.count("DeleteObjects") == 2
    assert sent.count("DeleteObject") == 1  # the run's heartbeat


async def test_a_run_alone_removes_a_files_claim_once_its_rows_are_written(tmp_path: Path) -> None:
    """The sweep at a run's end removed every claim of the run (an unlink took ~0.17 ms on
    the bench host's disk: 0.85 s for 5,000 claims). A run alone removes each claim as its
    rows land; with another run live, whose ledger read may predate those rows, the claim is
    marked done instead."""
    location = OutputLocation(root=str(tmp_path / "out"))
    claims_dir = tmp_path / "out" / "_state" / "claims" / "stt" / "cfg"
    async with Claims(location, "stt", "cfg", "run-a") as run_a:
        assert (await asyncio.to_thread(run_a.acquire, ["f1", "f2", "f3"])).mine == [
            "f1", "f2", "f3"]
        await asyncio.to_thread(run_a.mark_done, ["f1", "f2"])
        assert sorted(p.name for p in claims_dir.iterdir()) == ["f3.json"]
        async with Claims(location, "stt", "cfg", "run-b") as run_b:
            await asyncio.to_thread(run_a.mark_done, ["f3"])
            assert (await asyncio.to_thread(run_b.acquire, ["f3"])).done == ["f3"]
