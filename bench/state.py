"""`uv run python -m bench.state`: the state layer at months-of-runs scale, old path beside new.

Synthesises, in a temp dir, a ``files`` history of 1M rows over 300 date partitions and a
2M-row ``utterances`` partition (100k files x 20), then measures, each in a fresh child
process (peak RSS is the child's own ``ru_maxrss``, growth is over its RSS after imports):

* start-up: the ledger read of a run of 1,000 new files, today's ``read_ledger`` (the whole
  history, kept below as ``_old_read_ledger``) against ``store.ledger.LedgerLookup``, each
  beside the same run over an empty history;
* compaction of the 2M-row partition from fragments, old (``_old_compact_partition``, the
  algorithm of tasks/output.py before store/) against new; then the new one after one more
  fragment of new files, and after a fragment that supersedes rows in the big segment;
* a ``files`` partition of 1M rows in 10k fragments (a backfill's day, 100 files a chunk):
  its compaction, then again after one more fragment.

Prints a table and writes ``bench/results/state.json``. About 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store import LedgerLookup, OutputLocation, compact
from store.fragments import WRITTEN_AT_KEY
from store.location import PARTITIONING
from store.tables import TABLES, file_schema

MODEL = "stt"
CONFIG = "cfg000000001"
HISTORY_ROWS = 1_000_000
HISTORY_PARTITIONS = 300
RUN_FILES = 1_000
RUN_DATE = "2026-12-01"
BIG_DATE = "2026-06-15"
BIG_FILES = 100_000
UTTERANCES_PER_FILE = 20
BIG_FRAGMENTS = 200
WIDE_DATE = "2026-09-01"  # a backfill's day: one files partition of 1M rows in 10k fragments
WIDE_ROWS = 1_000_000
WIDE_FRAGMENTS = 10_000
SEED = 12
RESULTS = Path(__file__).parent / "results" / "state.json"
_T0_US = 1_735_689_600_000_000  # 2025-01-01 UTC in microseconds


# synthetic history


def _hex_ids(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{x:016x}" for x in rng.integers(0, 2**63, size=n, dtype=np.int64)]


def _files_table(ids: list[str], run: str, statuses: np.ndarray) -> pa.Table:
    n = len(ids)
    at = pa.array(_T0_US + np.arange(n, dtype=np.int64) * 1_000, pa.int64()).cast(
        pa.timestamp("us", tz="UTC")
    )
    columns: dict[str, pa.Array] = {
        "schema_version": pa.array(np.full(n, 2, np.int16)),
        "file_id": pa.array(ids),
        "config_hash": pa.array([CONFIG] * n),
        "source_uri": pa.array([f"s3://in/calls/{i}.wav" for i in ids]),
        "etag": pa.array(["e"] * n),
        "size_bytes": pa.array(np.full(n, 480_000, np.int64)),
        "status": pa.array(statuses),
        "attempts": pa.array(np.ones(n, np.int32)),
        "audio_duration_ms": pa.array(np.full(n, 30_000, np.int64)),
        "started_at": at,
        "finished_at": at,
        "flow_run_id": pa.array([run] * n),
    }
    schema = file_schema("files")
    return pa.table(
        [columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema
    )


def _utterances_table(ids: list[str], run: str) -> pa.Table:
    n = len(ids) * UTTERANCES_PER_FILE
    file_ids = np.repeat(np.array(ids, dtype=object), UTTERANCES_PER_FILE)
    idx = np.tile(np.arange(UTTERANCES_PER_FILE, dtype=np.int32), len(ids))
    columns: dict[str, pa.Array] = {
        "schema_version": pa.array(np.full(n, 2, np.int16)),
        "file_id": pa.array(file_ids, pa.string()),
        "config_hash": pa.array([CONFIG] * n),
        "idx": pa.array(idx),
        "utterance_uuid": pa.array([f"u-{i}" for i in range(n)]),
        "start_ms": pa.array(idx.astype(np.int64) * 1500),
        "end_ms": pa.array(idx.astype(np.int64) * 1500 + 1400),
        "duration_ms": pa.array(np.full(n, 1400, np.int64)),
        "speaker": pa.array(idx % 2),
        "language": pa.array(["en"] * n),
        "text": pa.array([f"utterance {i % 977} of a synthetic call, words" for i in range(n)]),
        "flow_run_id": pa.array([run] * n),
    }
    schema = file_schema("utterances")
    return pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def _write(table: pa.Table, directory: Path, name: str, stamp_ns: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({WRITTEN_AT_KEY: str(stamp_ns).encode()})
    pq.write_table(table, directory / name)


def _partition(root: Path, table: str, date: str) -> Path:
    return root / table / f"model={MODEL}" / f"date={date}"


def synthesise(root: Path) -> dict[str, Any]:
    """The history: compacted ``files`` partitions, and the big partition as fragments."""
    rng = np.random.default_rng(SEED)
    per = HISTORY_ROWS // HISTORY_PARTITIONS
    statuses = np.array(["completed"] * 9 + ["failed"])
    stamp = time.time_ns() - 86_400 * 10**9  # written a day ago
    for p in range(HISTORY_PARTITIONS):
        date = (np.datetime64("2025-06-01") + p).astype(str)
        ids = _hex_ids(rng, per)
        table = _files_table(ids, f"run-{p}", statuses[np.arange(per) % 10])
        _write(table, _partition(root, "files", date), "part-compacted-h0-0.parquet", stamp)
    big_ids = _hex_ids(rng, BIG_FILES)
    chunk = BIG_FILES // BIG_FRAGMENTS
    for f in range(BIG_FRAGMENTS):
        ids = big_ids[f * chunk : (f + 1) * chunk]
        _write(_utterances_table(ids, "run-big"), _partition(root, "utterances", BIG_DATE),
               f"part-frag{f:04d}-0.parquet", stamp + f)
        _write(_files_table(ids, "run-big", np.array(["completed"] * len(ids))),
               _partition(root, "files", BIG_DATE), f"part-frag{f:04d}-0.parquet", stamp + f)
    return {"big_ids": big_ids[:100]}


def synthesise_wide(root: Path) -> None:
    """One ``files`` partition of WIDE_ROWS rows in WIDE_FRAGMENTS fragments (100 a chunk)."""
    ids = _hex_ids(np.random.default_rng(SEED + 2), WIDE_ROWS)  # none of _run_ids's
    per = WIDE_ROWS // WIDE_FRAGMENTS
    stamp = time.time_ns() - 86_400 * 10**9
    completed = np.array(["completed"] * per)
    for f in range(WIDE_FRAGMENTS):
        _write(_files_table(ids[f * per:(f + 1) * per], f"run-{f // 100}", completed),
               _partition(root, "files", WIDE_DATE), f"part-frag{f:05d}-0.parquet", stamp + f)


# the old algorithms (tasks/output.py before store/), for the comparison only


def _old_read_ledger(root: str, model: str, config_hash: str) -> dict[str, str]:
    schema = TABLES["files"][0]
    dataset = ds.dataset(
        f"{root}/files", schema=schema, format="parquet", partitioning=PARTITIONING
    )
    scanner = dataset.scanner(
        columns=["file_id", "status", "finished_at"],
        filter=(pc.field("model") == model) & (pc.field("config_hash") == config_hash),
        batch_size=65_536,
    )
    best: dict[str, tuple[bool, int, str]] = {}
    for batch in scanner.to_batches():
        finished = pc.fill_null(batch.column("finished_at").cast(pa.int64()), -1)
        for file_id, status, at in zip(
            batch.column("file_id").to_pylist(),
            batch.column("status").to_pylist(),
            finished.to_pylist(),
            strict=True,
        ):
            rank = (status == "completed", at, status)
            if file_id not in best or rank >= best[file_id]:
                best[file_id] = rank
    return {file_id: rank[2] for file_id, rank in best.items()}


def _old_compact_partition(directory: str, table_name: str) -> None:
    fs = pafs.LocalFileSystem()
    _, keys = TABLES[table_name]
    schema = file_schema(table_name)
    inputs = [i for i in fs.get_file_info(pafs.FileSelector(directory)) if i.is_file]
    loaded = []
    for info in inputs:
        table = pq.read_table(info.path).cast(schema)
        order = int((table.schema.metadata or {}).get(WRITTEN_AT_KEY, b"0"))
        loaded.append(((order, info.base_name), table))
    loaded.sort(key=lambda item: item[0])
    parts = []
    for rank, (_, table) in enumerate(loaded):
        table = table.append_column("_rank", pa.array([rank] * table.num_rows, pa.int32()))
        parts.append(table.append_column("_row", pa.array(range(table.num_rows), pa.int64())))
    combined = pa.concat_tables(parts).sort_by([("_rank", "ascending"), ("_row", "ascending")])
    combined = combined.append_column("_pos", pa.array(range(combined.num_rows), pa.int64()))
    winners = combined.group_by(list(keys), use_threads=False).aggregate([("_pos", "max")])
    result = combined.take(winners.column("_pos_max"))
    result = result.select(schema.names).sort_by([(key, "ascending") for key in keys])
    pq.write_table(result, f"{directory}/part-compacted-old-0.parquet")
    for info in inputs:
        fs.delete_file(info.path)


# measurements, one child process each


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run_ids(n: int) -> list[str]:
    return _hex_ids(np.random.default_rng(SEED + 1), n)


def _lookup_new(root: str) -> None:
    lookup = LedgerLookup(OutputLocation(root=root), MODEL, CONFIG)
    todo = [i for i in _run_ids(RUN_FILES) if lookup.status(i, RUN_DATE) not in {"completed"}]
    assert len(todo) == RUN_FILES


def _lookup_old(root: str) -> None:
    done = _old_read_ledger(root, MODEL, CONFIG) if Path(root, "files").exists() else {}
    todo = [i for i in _run_ids(RUN_FILES) if done.get(i) != "completed"]
    assert len(todo) == RUN_FILES


def _compact_new(root: str) -> None:
    compact(OutputLocation(root=root), "utterances", MODEL, [BIG_DATE])


def _compact_files(root: str) -> None:
    compact(OutputLocation(root=root), "files", MODEL, [BIG_DATE])


def _compact_wide(root: str) -> None:
    compact(OutputLocation(root=root), "files", MODEL, [WIDE_DATE])


def _compact_old(root: str) -> None:
    _old_compact_partition(str(_partition(Path(root), "utterances", BIG_DATE)), "utterances")


CHILD_TASKS: dict[str, Callable[[str], None]] = {
    "lookup-new": _lookup_new,
    "lookup-old": _lookup_old,
    "compact-new": _compact_new,
    "compact-old": _compact_old,
    "compact-files": _compact_files,
    "compact-wide": _compact_wide,
}
CHILD_TIMEOUT_SECONDS = 600


def run_child(tasks: Mapping[str, Callable[[str], dict[str, Any] | None]], task: str,
              arg: str) -> None:
    """In a child process: run one task; print its time, peak RSS and RSS growth over the
    process after imports, the arrow allocator, and what the task returns, as JSON."""
    base = _rss_mb()
    started = time.perf_counter()
    found = tasks[task](arg) or {}
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 3), "peak_mb": round(peak, 1),
                      "growth_mb": round(peak - base, 1),
                      "allocator": pa.default_memory_pool().backend_name, **found},
                     default=str))


def measure(task: str, arg: Path | str, module: str = "bench.state") -> dict[str, Any]:
    """Run `python -m <module> --child <task> <arg>` and return what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", module, "--child", task, str(arg)],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
        timeout=CHILD_TIMEOUT_SECONDS,
    )
    if out.returncode:
        raise RuntimeError(f"child {module} {task} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _add_fragment(root: Path, ids: list[str], run: str, name: str) -> None:
    stamp = time.time_ns()
    _write(_utterances_table(ids, run), _partition(root, "utterances", BIG_DATE), name, stamp)
    files = _files_table(ids, run, np.array(["completed"] * len(ids)))
    # Finished now, as a real re-run's files are: the old attempt's rows, written a day ago,
    # then lose to it (rows written after a winner finished would be kept, store/winners.py).
    now_us = time.time_ns() // 1_000 + np.arange(len(ids), dtype=np.int64)
    finished = pa.array(now_us, pa.int64()).cast(files["finished_at"].type)
    files = files.set_column(files.schema.get_field_index("finished_at"), "finished_at", finished)
    _write(files, _partition(root, "files", BIG_DATE), name, stamp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.state", description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("TASK", "ROOT"), help=argparse.SUPPRESS)
    parser.add_argument("--skip-old-compaction", action="store_true",
                        help="skip the old compaction (it peaks at ~2.5 GB)")
    args = parser.parse_args(argv)
    if args.child:
        run_child(CHILD_TASKS, *args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-state-"))
    results: dict[str, Any] = {}
    try:
        history, empty = work / "history", work / "empty"
        empty.mkdir()
        started = time.perf_counter()
        info = synthesise(history)
        print(f"synthesised in {time.perf_counter() - started:.0f} s under {work}", flush=True)
        for path in ("old", "new"):
            with_history = measure(f"lookup-{path}", history)
            without = measure(f"lookup-{path}", empty)
            results[f"startup_{path}"] = {
                "history": with_history,
                "empty": without,
                "added_seconds": round(with_history["seconds"] - without["seconds"], 3),
                "added_mb": round(with_history["growth_mb"] - without["growth_mb"], 1),
            }
            print(f"start-up {path}: {results[f'startup_{path}']}", flush=True)
        big = _partition(history, "utterances", BIG_DATE)
        if not args.skip_old_compaction:
            copy = work / "old"
            shutil.copytree(big, _partition(copy, "utterances", BIG_DATE))
            results["compact_old_2m_fragments"] = measure("compact-old", copy)
            print(f"old compaction: {results['compact_old_2m_fragments']}", flush=True)
            shutil.rmtree(copy)
        results["compact_new_2m_fragments"] = measure("compact-new", history)
        results["compact_files_100k_fragments"] = measure("compact-files", history)
        print(f"new compaction, 2M rows from fragments: {results['compact_new_2m_fragments']}",
              flush=True)
        # As a run does: its files partition is compacted first (tables in name order).
        _add_fragment(history, _run_ids(RUN_FILES), "run-next", "part-next-0.parquet")
        measure("compact-files", history)
        results["compact_new_plus_1000_new_files"] = measure("compact-new", history)
        print(f"new compaction, +1,000 new files: {results['compact_new_plus_1000_new_files']}",
              flush=True)
        _add_fragment(history, info["big_ids"], "run-again", "part-again-0.parquet")
        measure("compact-files", history)
        results["compact_new_superseding_100_files"] = measure("compact-new", history)
        print("new compaction, 100 files of the segment sent again: "
              f"{results['compact_new_superseding_100_files']}", flush=True)
        wide = work / "wide"
        started = time.perf_counter()
        synthesise_wide(wide)
        print(f"synthesised {WIDE_FRAGMENTS:,} fragments in {time.perf_counter() - started:.0f} s",
              flush=True)
        results["compact_files_1m_10k_fragments"] = measure("compact-wide", wide)
        wide_rows = _partition(wide, "files", WIDE_DATE)
        one_more = _files_table(_run_ids(100), "run-more", np.array(["completed"] * 100))
        _write(one_more, wide_rows, "part-more-0.parquet", time.time_ns())
        results["compact_files_1m_plus_one_fragment"] = measure("compact-wide", wide)
        results["wide_rows_after"] = pq.ParquetDataset(str(wide_rows)).read(
            columns=["file_id"]).num_rows
        results["wide_files_after"] = len(list(wide_rows.glob("*.parquet")))
        print("files partition, 1M rows in 10k fragments: "
              f"{results['compact_files_1m_10k_fragments']}; then one more fragment: "
              f"{results['compact_files_1m_plus_one_fragment']}", flush=True)
        rows = pq.ParquetDataset(str(big)).read(columns=["file_id", "idx", "flow_run_id"])
        results["resent_rows_won"] = pc.sum(pc.equal(rows["flow_run_id"], "run-again")).as_py()
        results["rows_after"] = rows.num_rows
        results["files_after"] = len(rows.group_by(["file_id", "idx"]).aggregate([]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
