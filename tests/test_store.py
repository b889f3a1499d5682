"""The state layer under months of runs: ledger pruning, one winner per file version,
fragments that appear whole, compaction that rewrites only what is new, and two compactors
at once (real processes)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from store import LedgerLookup, OutputLocation, compact, read_ledger, read_table, write_fragment
from store.compaction import MAX_SEGMENTS, SEGMENT_PREFIX
from store.tables import file_id_for
from tasks.usage import read_daily_usage

MODEL = "velma-2-stt-batch"
DATE = "2025-03-01"
CFG = "cfg1"
PROCESS_TIMEOUT_SECONDS = 120
REPO = Path(__file__).resolve().parents[1]


def _now(offset_s: float = 0.0) -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset_s)


def _file_row(file_id: str, status: str, run: str, finished: dt.datetime, **extra: Any) -> dict:
    return {
        "file_id": file_id,
        "config_hash": CFG,
        "model": MODEL,
        "date": DATE,
        "status": status,
        "flow_run_id": run,
        "started_at": finished - dt.timedelta(seconds=1),
        "finished_at": finished,
    } | extra


def _utterances(file_id: str, run: str, texts: list[str]) -> list[dict]:
    return [
        {
            "file_id": file_id,
            "config_hash": CFG,
            "model": MODEL,
            "date": DATE,
            "idx": idx,
            "text": text,
            "flow_run_id": run,
        }
        for idx, text in enumerate(texts)
    ]


def _data_files(root: Path, table: str, date: str = DATE) -> list[Path]:
    directory = root / table / f"model={MODEL}" / f"date={date}"
    return sorted(p for p in directory.iterdir() if not p.name.startswith(("_", ".")))


def _wait_for(condition: Any, what: str, timeout: float = PROCESS_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# the ledger lookup


def test_lookup_reads_only_the_partitions_the_listing_touches(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    done = file_id_for("s3://in/a.wav", "e1")
    write_fragment(location, "files", [_file_row(done, "completed", "r1", _now())], fragment_id="a")
    write_fragment(location, "files", [_file_row("x", "failed", "r1", _now())], fragment_id="b")
    # Another day of history that a run listing only DATE must never open.
    other = tmp_path / "files" / f"model={MODEL}" / "date=2024-01-01"
    other.mkdir(parents=True)
    (other / "part-garbage-0.parquet").write_bytes(b"not parquet")

    lookup = LedgerLookup(location, MODEL, CFG)
    assert not lookup.is_loaded(DATE)
    assert lookup.status(done, DATE) == "completed"
    assert lookup.status("x", DATE) == "failed"
    assert lookup.status(file_id_for("s3://in/b.wav", "e1"), DATE) is None
    assert lookup.status(done, "2025-03-02") is None  # a day with no partition is empty
    assert LedgerLookup(location, MODEL, "other-config").status(done, DATE) is None
    with pytest.raises(pa.ArrowInvalid):
        read_ledger(location, MODEL, CFG)  # the old whole-history read opens every day


def test_the_ledger_and_files_compaction_agree_on_the_winner(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    t = _now()
    write_fragment(
        location,
        "files",
        [_file_row("a", "completed", "r1", t), _file_row("b", "failed", "r1", t)],
        fragment_id="r1",
    )
    # A later run: a failure never undoes a completion; otherwise the latest attempt wins.
    write_fragment(
        location,
        "files",
        [_file_row("a", "failed", "r2", t + dt.timedelta(hours=1)),
         _file_row("b", "deferred_quota", "r2", t + dt.timedelta(hours=1))],
        fragment_id="r2",
    )
    before = read_ledger(location, MODEL, CFG)
    assert before == {"a": "completed", "b": "deferred_quota"}
    compact(location, "files", MODEL, [DATE])
    rows = read_table(location, "files").to_pylist()
    assert {r["file_id"]: (r["status"], r["flow_run_id"]) for r in rows} == {
        "a": ("completed", "r1"),
        "b": ("deferred_quota", "r2"),
    }
    assert len(rows) == 2 and read_ledger(location, MODEL, CFG) == before


# child rows follow the winner


def test_child_rows_are_those_of_the_winning_attempt_only(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    # Run 1 wrote three utterances and crashed before its ledger row.
    write_fragment(location, "utterances", _utterances("a", "r1", ["o0", "o1", "o2"]),
                   fragment_id="r1")
    compact(location, "utterances", MODEL, [DATE])
    assert len(read_table(location, "utterances")) == 3  # pending: its ledger row may follow
    # Run 2 sent it again; the answer has two utterances.
    write_fragment(location, "utterances", _utterances("a", "r2", ["n0", "n1"]), fragment_id="r2")
    write_fragment(location, "files", [_file_row("a", "completed", "r2", _now())],
                   fragment_id="r2")
    compact(location, "utterances", MODEL, [DATE])
    rows = read_table(location, "utterances").sort_by("idx").to_pylist()
    assert [(r["text"], r["flow_run_id"]) for r in rows] == [("n0", "r2"), ("n1", "r2")]

    # Run 3 fails the same file later: the completed attempt keeps its rows.
    write_fragment(location, "files", [_file_row("a", "failed", "r3", _now(5))], fragment_id="r3")
    compact(location, "files", MODEL, [DATE])
    compact(location, "utterances", MODEL, [DATE])
    assert [r["text"] for r in read_table(location, "utterances").sort_by("idx").to_pylist()] == [
        "n0", "n1"
    ]
    assert read_ledger(location, MODEL, CFG) == {"a": "completed"}


def test_a_completed_attempt_without_rows_leaves_none_of_an_older_one(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    write_fragment(location, "utterances", _utterances("a", "r1", ["o0"]), fragment_id="r1")
    write_fragment(location, "files", [_file_row("a", "completed", "r1", _now())],
                   fragment_id="r1")
    compact(location, "utterances", MODEL, [DATE])
    # A second config-identical run (two runs at once) completed later with no utterances.
    write_fragment(location, "files", [_file_row("a", "completed", "r2", _now(5))],
                   fragment_id="r2")
    write_fragment(location, "transcripts", [
        {"file_id": "a", "config_hash": CFG, "model": MODEL, "date": DATE, "flow_run_id": "r2",
         "text": "", "utterance_count": 0}
    ], fragment_id="r2")
    write_fragment(location, "utterances", _utterances("b", "r2", ["b0"]), fragment_id="r2")
    compact(location, "utterances", MODEL, [DATE])
    rows = read_table(location, "utterances").to_pylist()
    assert [(r["file_id"], r["text"]) for r in rows] == [("b", "b0")]


# fragments appear whole

_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import pyarrow as pa
    import pyarrow.fs as pafs
    from store.fragments import write_atomically

    path = sys.argv[1]
    n = 500_000
    table = pa.table({"file_id": pa.array(np.arange(n).astype(str)),
                      "start_ms": pa.array(np.arange(n))})
    write_atomically(pafs.LocalFileSystem(), table, path)
    print("first", flush=True)
    while True:
        write_atomically(pafs.LocalFileSystem(), table, path)
    """
)


def test_a_write_killed_midway_leaves_no_half_file(tmp_path: Path) -> None:
    directory = tmp_path / "t" / f"model={MODEL}" / f"date={DATE}"
    target = directory / "part-big-0.parquet"
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(target)], cwd=REPO, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"first"
        _wait_for(lambda: any(p.name.startswith("_tmp-") for p in directory.iterdir()),
                  "a write in progress")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=PROCESS_TIMEOUT_SECONDS)
    finally:
        if child.poll() is None:
            child.kill()
    assert [p.name for p in directory.iterdir() if not p.name.startswith("_")] == [target.name]
    assert pq.read_metadata(target).num_rows == 500_000
    assert len(pd.read_parquet(tmp_path / "t")) == 500_000  # readers skip the "_tmp-" file


# compaction rewrites what is new


def test_compaction_rewrites_only_segments_that_lose_rows(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    t = _now()
    write_fragment(location, "files", [_file_row(f"f{i}", "failed", "r1", t) for i in range(50)],
                   fragment_id="r1")
    compact(location, "files", MODEL, [DATE])
    (first,) = _data_files(tmp_path, "files")
    inode = first.stat().st_ino
    # New files only: the segment stays as it is, a second one holds the new rows.
    write_fragment(location, "files", [_file_row(f"g{i}", "completed", "r2", t) for i in range(5)],
                   fragment_id="r2")
    compact(location, "files", MODEL, [DATE])
    files = _data_files(tmp_path, "files")
    assert len(files) == 2 and first in files and first.stat().st_ino == inode
    # A retry of one failed file: only the segment holding its old row is rewritten.
    second = next(p for p in files if p != first)
    write_fragment(location, "files", [_file_row("f3", "completed", "r3", _now(5))],
                   fragment_id="r3")
    compact(location, "files", MODEL, [DATE])
    files = _data_files(tmp_path, "files")
    assert first not in files and second in files and len(files) == 2
    rows = read_table(location, "files").to_pylist()
    assert len(rows) == 55 and {r["file_id"]: r["status"] for r in rows}["f3"] == "completed"


def test_segments_stay_few_however_many_compactions(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    for run in range(3 * MAX_SEGMENTS):
        rows = [_file_row(f"f{run}-{i}", "completed", f"r{run}", _now()) for i in range(3)]
        write_fragment(location, "files", rows, fragment_id=f"r{run}")
        compact(location, "files", MODEL, [DATE])
        files = _data_files(tmp_path, "files")
        assert len(files) <= MAX_SEGMENTS
        assert all(p.name.startswith(SEGMENT_PREFIX) for p in files)
    assert len(read_table(location, "files")) == 3 * 3 * MAX_SEGMENTS


# two compactors at once (real processes)

_COMPACTOR = textwrap.dedent(
    """
    import datetime as dt, os, sys, time
    from store import OutputLocation, compact, write_fragment

    root, me, ready, go = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    endpoint = os.environ.get("STORE_TEST_S3")
    location = OutputLocation(root=root, s3_endpoint_url=endpoint,
        aws_access_key_id="testing" if endpoint else None,
        aws_secret_access_key="testing" if endpoint else None)
    open(ready, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        assert time.monotonic() < deadline, "no go signal"
        time.sleep(0.01)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for k in range({rounds}):
        # Shared keys: both processes write them; b's round k finishes after a's round k.
        at = t0 + dt.timedelta(seconds=k, milliseconds=500 if me == "b" else 0)
        rows = [dict(file_id=f"s{{i}}", status="completed", flow_run_id=me, finished_at=at)
                for i in range(20)]
        rows += [dict(file_id=f"{{me}}{{k}}-{{i}}", status="completed", flow_run_id=me,
                      finished_at=at) for i in range(20)]
        rows = [r | dict(config_hash="cfg1", model="{model}", date="{date}") for r in rows]
        write_fragment(location, "files", rows, fragment_id=f"{{me}}-{{k}}")
        compact(location, "files", "{model}", ["{date}"])
    """
)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ).create_bucket(Bucket="results")
    try:
        yield endpoint
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_processes_compacting_at_once_lose_and_duplicate_nothing(
    tmp_path: Path, where: str, request: pytest.FixtureRequest
) -> None:
    rounds = 4 if where == "local" else 2
    env = dict(os.environ)
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        env["STORE_TEST_S3"] = endpoint
        location = OutputLocation(root="s3://results/two", s3_endpoint_url=endpoint,
                                  aws_access_key_id="testing", aws_secret_access_key="testing")
    else:
        location = OutputLocation(root=str(tmp_path / "out"))
    script = _COMPACTOR.format(rounds=rounds, model=MODEL, date=DATE)
    go = tmp_path / "go"
    children = {}
    for me in ("a", "b"):
        ready = tmp_path / f"ready-{me}"
        children[me] = (subprocess.Popen(
            [sys.executable, "-c", script, location.root, me, str(ready), str(go)],
            cwd=REPO, env=env,
        ), ready)
    try:
        _wait_for(lambda: all(ready.exists() for _, ready in children.values()), "both ready")
        go.touch()
        for child, _ in children.values():
            assert child.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 0
    finally:
        for child, _ in children.values():
            if child.poll() is None:
                child.kill()
    rows = read_table(location, "files").to_pylist()
    keys = [r["file_id"] for r in rows]
    assert len(keys) == len(set(keys))  # no duplicate
    expected = {f"s{i}" for i in range(20)}
    expected |= {f"{me}{k}-{i}" for me in "ab" for k in range(rounds) for i in range(20)}
    assert set(keys) == expected  # nothing lost
    winners = {r["file_id"]: (r["flow_run_id"], r["finished_at"]) for r in rows}
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    last = start + dt.timedelta(seconds=rounds - 1, milliseconds=500)
    assert all(winners[f"s{i}"] == ("b", last) for i in range(20))


@pytest.mark.parametrize(("preset", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_our_processes_allocate_arrow_memory_from_the_system_allocator(
    preset: str | None, expected: str
) -> None:
    """mimalloc (arrow's default) kept what compaction had freed; a user's own choice stands."""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if preset:
        env["ARROW_DEFAULT_MEMORY_POOL"] = preset
    out = subprocess.run(
        [sys.executable, "-c",
         "import blocks, pyarrow; print(pyarrow.default_memory_pool().backend_name)"],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )
    assert out.stdout.strip() == expected


_WRITE_AND_COMPACT = textwrap.dedent("""
    import datetime as dt, sys
    from store import OutputLocation, compact, write_fragment
    root, table, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    location = OutputLocation(root=root)
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for k in range(rounds):
        for i in range(5):
            row = {{"file_id": f"w{{k}}-{{i}}", "config_hash": "cfg1", "model": "{model}",
                   "date": "{date}", "flow_run_id": "w", "finished_at": when}}
            if table == "files":
                row |= {{"status": "completed", "started_at": when}}
            else:
                row |= {{"audio_duration_ms": 1000}}
            rows = [row]
            write_fragment(location, table, rows, fragment_id=f"w{{k}}-{{i}}")
        compact(location, table, "{model}", ["{date}"])
""")
_COMPACTED_ROUNDS = 40


def _ledger_files(location: OutputLocation) -> int:
    return len(LedgerLookup(location, MODEL, CFG).statuses(DATE))


def _usage_seconds(location: OutputLocation) -> int:
    return sum(read_daily_usage(location, MODEL, [dt.date.fromisoformat(DATE)]).values()) // 1000


def _compacted_transcripts(location: OutputLocation) -> int:
    """A child table's compaction reads the ledger partition of its date, twice."""
    rows = [{"file_id": f"w0-{i}", "config_hash": CFG, "model": MODEL, "date": DATE,
             "flow_run_id": "w", "text": "", "duration_ms": 1000} for i in range(5)]
    write_fragment(location, "transcripts", rows, fragment_id=f"t{time.monotonic_ns()}")
    compact(location, "transcripts", MODEL, [DATE])
    return _ledger_files(location)


@pytest.mark.parametrize(
    ("table", "read"),
    [("files", _ledger_files), ("usage", _usage_seconds), ("files", _compacted_transcripts)],
    ids=["ledger", "usage", "child-compaction"],
)
def test_a_read_during_another_processs_compaction_sees_every_file(
    tmp_path: Path, table: str, read: Any
) -> None:
    """A compaction deletes the fragments it folded; a reader that listed them just before
    must list again, not fail the run. Seen in CI: two runs on one output, one compacting
    while the other's listing read the ledger. A run's budget reads `usage` the same way."""
    location = OutputLocation(root=str(tmp_path / "out"))
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITE_AND_COMPACT.format(model=MODEL, date=DATE),
         location.root, table, str(_COMPACTED_ROUNDS)], cwd=REPO,
    )
    reads = 0
    try:
        while writer.poll() is None:
            read(location)  # raised FileNotFoundError when a listed fragment was gone
            reads += 1
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.wait(timeout=PROCESS_TIMEOUT_SECONDS) == 0
    assert read(location) == 5 * _COMPACTED_ROUNDS
    assert reads > 0
