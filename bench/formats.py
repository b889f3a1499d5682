"""`uv run --group formats python -m bench.formats`: the state layer as a Delta Lake table
(``deltalake``, delta-rs) beside what it is today, Hive Parquet with store/compaction.py.

The same write pattern on both, with bench/state.py's synthetic 2M-row ``utterances``
partition (100k files x 20 utterances, seeded): 200 pieces of 500 files, as 200 run chunks
write them, folded into one table; then a re-run that sends 100 of those files again (their
20 rows each, new values). Each step runs in a fresh child process (peak RSS is the child's
own ``ru_maxrss``, growth is over its RSS after imports), timed and measured as bench.state
measures:

* Delta: 200 appends, ``optimize.compact()``, then the re-run as a ``merge`` upsert on
  (file_id, idx), with the metrics delta-rs returns. ``optimize`` only bin-packs files (a
  key appended twice stays twice); ``store.compact`` also picks each key's winner;
* ours: the 200 fragments (the ``files`` partition beside them as one segment, as earlier
  compactions leave it), ``store.compact``, then one more fragment with the 100 files and
  ``store.compact`` again (bench.state's own ``compact-new`` child);
* a plain reader of each directory afterwards (pandas/pyarrow and DuckDB, no Delta log, no
  vacuum): the rows it sees against the distinct (file_id, idx) keys, beside what each
  format's own reader sees.

The write step's time includes synthesising the rows (and, for ours, the 100k-row
``files`` segment). Prints a table and writes ``bench/results/formats.json``. About a minute
on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from textwrap import shorten
from typing import Any

import deltalake
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake
from rich.console import Console
from rich.table import Table

from bench.state import (
    BIG_DATE,
    BIG_FILES,
    BIG_FRAGMENTS,
    SEED,
    UTTERANCES_PER_FILE,
    _files_table,
    _hex_ids,
    _partition,
    _utterances_table,
    _write,
    measure,
    run_child,
)

RESENT_FILES = 100
MERGE_PREDICATE = "t.file_id = s.file_id AND t.idx = s.idx"
# The recursive glob is the usual one; the flat one is what is left for an unpartitioned
# Delta table, whose _delta_log/ holds Parquet checkpoints of another schema.
DUCKDB_GLOBS = ("**/*.parquet", "*.parquet")
MODULE = "bench.formats"  # children run as `python -m bench.formats --child ...`
RESULTS = Path(__file__).parent / "results" / "formats.json"


# the synthetic data, the same in every child (seeded)


def _big_ids() -> list[str]:
    return _hex_ids(np.random.default_rng(SEED), BIG_FILES)


def _chunks() -> list[list[str]]:
    ids, size = _big_ids(), BIG_FILES // BIG_FRAGMENTS
    return [ids[f * size : (f + 1) * size] for f in range(BIG_FRAGMENTS)]


def _delta_dir(work: str) -> str:
    return f"{work}/delta"


def _hive_root(work: str) -> Path:
    return Path(work) / "hive"


# the child tasks: each returns what it found beside the time and memory


def _delta_appends(work: str) -> dict[str, Any]:
    for ids in _chunks():
        write_deltalake(_delta_dir(work), _utterances_table(ids, "run-big"), mode="append")
    return {"version": DeltaTable(_delta_dir(work)).version()}


def _delta_compact(work: str) -> dict[str, Any]:
    return {"metrics": DeltaTable(_delta_dir(work)).optimize.compact()}


def _delta_merge(work: str) -> dict[str, Any]:
    source = _utterances_table(_big_ids()[:RESENT_FILES], "run-again")
    metrics = (
        DeltaTable(_delta_dir(work))
        .merge(source, predicate=MERGE_PREDICATE, source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )
    return {"metrics": metrics}


def _hive_fragments(work: str) -> dict[str, Any]:
    root = _hive_root(work)
    stamp = time.time_ns() - 86_400 * 10**9  # written a day ago, as bench.state does
    for f, ids in enumerate(_chunks()):
        _write(_utterances_table(ids, "run-big"), _partition(root, "utterances", BIG_DATE),
               f"part-frag{f:04d}-0.parquet", stamp + f)
    # The ledger the utterances compaction asks, as the runs' own files compactions leave
    # it (one segment); bench.state measures that compaction itself.
    ids = _big_ids()
    _write(_files_table(ids, "run-big", np.array(["completed"] * len(ids))),
           _partition(root, "files", BIG_DATE), "part-compacted-b0-0.parquet", stamp)
    return {}


def _resend_fragment(root: Path, ids: list[str]) -> None:
    """The re-run's fragments: its ``files`` rows finish now, after the rows they supersede
    were written, as a real re-run's do. (bench.state's ``_add_fragment`` dates them in
    2025, before its fragments' written-at stamps, so there the old attempt keeps winning.)
    """
    stamp = time.time_ns()
    _write(_utterances_table(ids, "run-again"), _partition(root, "utterances", BIG_DATE),
           "part-again-0.parquet", stamp)
    files = _files_table(ids, "run-again", np.array(["completed"] * len(ids)))
    now = pa.array(np.full(len(ids), stamp // 1_000, np.int64)).cast(files["finished_at"].type)
    files = files.set_column(files.schema.get_field_index("finished_at"), "finished_at", now)
    _write(files, _partition(root, "files", BIG_DATE), "part-again-0.parquet", stamp)


def _plain_readers(directory: str) -> dict[str, Any]:
    """What a reader that knows nothing of a Delta log sees: every Parquet file there."""
    # Imported here, not at the top, so that no other child's peak carries them.
    import pandas as pd

    frame = pd.read_parquet(directory, engine="pyarrow", columns=["file_id", "idx"])
    found = {"pandas": {"rows": len(frame), "keys": len(frame.drop_duplicates())}}
    try:
        import duckdb
    except ImportError:
        return found | {glob: {"skipped": "duckdb is not installed"} for glob in DUCKDB_GLOBS}
    for glob in DUCKDB_GLOBS:
        query = (f"SELECT count(*), count(DISTINCT (file_id, idx)) "
                 f"FROM read_parquet('{directory}/{glob}')")
        try:
            rows, keys = duckdb.execute(query).fetchone()
            found[glob] = {"rows": rows, "keys": keys}
        except duckdb.Error as error:
            # Relative paths: the temp dir is gone once the run ends.
            found[glob] = {"error": str(error).splitlines()[0].replace(f"{directory}/", "")}
    return found


CHILD_TASKS: dict[str, Callable[[str], dict[str, Any]]] = {
    "delta-appends": _delta_appends,
    "delta-compact": _delta_compact,
    "delta-merge": _delta_merge,
    "hive-fragments": _hive_fragments,
    "read": _plain_readers,
}


def _on_disk(directory: Path) -> dict[str, Any]:
    """The data files under a directory (a Delta table keeps replaced ones until vacuum)."""
    files = [p for p in directory.rglob("*.parquet") if "_delta_log" not in p.parts]
    return {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 2**20, 1)}


def _live(dataset: ds.Dataset) -> dict[str, int]:
    """What a reader that knows the format sees: every key once, the re-run's rows winning."""
    # The cast: delta-rs's dataset types strings as string_view, which `==` a str cannot.
    again = pc.field("flow_run_id").cast(pa.string()) == "run-again"
    return {"rows": dataset.count_rows(), "resent_rows": dataset.count_rows(filter=again)}


def _run_delta(work: Path) -> dict[str, Any]:
    found = {"appends": measure("delta-appends", work, module=MODULE)}
    print(f"delta, {BIG_FRAGMENTS} appends: {found['appends']}", flush=True)
    found["compact"] = measure("delta-compact", work, module=MODULE)
    print(f"delta, optimize.compact: {found['compact']}", flush=True)
    found["resend"] = measure("delta-merge", work, module=MODULE)
    print(f"delta, merge of {RESENT_FILES} files: {found['resend']}", flush=True)
    directory = Path(_delta_dir(str(work)))
    found["on_disk"] = _on_disk(directory)
    # A plain glob of the directory reaches these too (Parquet, the log's own schema).
    found["checkpoints"] = sorted(p.name for p in directory.glob("_delta_log/*.checkpoint.parquet"))
    found["live"] = _live(DeltaTable(str(directory)).to_pyarrow_dataset())
    found["plain_readers"] = measure("read", directory, module=MODULE)
    print(f"delta, plain readers: {found['plain_readers']}", flush=True)
    return found


def _run_hive(work: Path) -> dict[str, Any]:
    root = _hive_root(str(work))
    found = {"appends": measure("hive-fragments", work, module=MODULE)}
    found["compact"] = measure("compact-new", root)
    print(f"ours, store.compact of 2M rows: {found['compact']}", flush=True)
    _resend_fragment(root, _big_ids()[:RESENT_FILES])
    # As a run does: its files partition is compacted first (tables in name order).
    measure("compact-files", root)
    found["resend"] = measure("compact-new", root)
    print(f"ours, store.compact after {RESENT_FILES} files again: {found['resend']}", flush=True)
    directory = _partition(root, "utterances", BIG_DATE)
    found["on_disk"] = _on_disk(directory)
    found["live"] = _live(ds.dataset(directory, format="parquet"))
    found["plain_readers"] = measure("read", directory, module=MODULE)
    print(f"ours, plain readers: {found['plain_readers']}", flush=True)
    return found


# the report


def _cost(step: dict[str, Any]) -> str:
    return f"{step['seconds']:.1f} s, {step['peak_mb']:.0f} MB (+{step['growth_mb']:.0f})"


def _seen(reader: dict[str, Any]) -> str:
    if "rows" not in reader:
        return reader.get("skipped") or shorten(f"fails: {reader['error']}", 110)
    return f"{reader['rows']:,} rows / {reader['keys']:,} keys"


def _merge_note(metrics: dict[str, Any]) -> str:
    return (f"{metrics['num_target_files_removed']} file(s) rewritten, "
            f"{metrics['num_target_rows_copied']:,} rows copied, "
            f"{metrics['num_target_rows_updated']:,} updated")


def _live_note(live: dict[str, int]) -> str:
    return f"{live['rows']:,} ({live['resent_rows']:,})"


def _disk_note(disk: dict[str, Any]) -> str:
    return f"{disk['files']} file(s), {disk['mb']} MB"


def _print(results: dict[str, Any]) -> None:
    delta, hive = results["delta"], results["hive"]
    table = Table(title=f"{BIG_FILES * UTTERANCES_PER_FILE:,} utterances rows: Delta Lake "
                  f"(deltalake {results['deltalake']}) beside Hive Parquet + store.compact")
    table.add_column("step (time, peak RSS (growth))")
    table.add_column("Delta Lake")
    table.add_column("Hive Parquet (ours)")
    table.add_row(f"write {BIG_FRAGMENTS} pieces of {BIG_FILES // BIG_FRAGMENTS} files",
                  _cost(delta["appends"]), _cost(hive["appends"]))
    table.add_row("fold them into one table", _cost(delta["compact"]), _cost(hive["compact"]))
    table.add_row(f"re-run: {RESENT_FILES} files sent again",
                  f"{_cost(delta['resend'])}\n{_merge_note(delta['resend']['metrics'])}",
                  _cost(hive["resend"]))
    for reader in ("pandas", *DUCKDB_GLOBS):
        name = reader if reader == "pandas" else f"duckdb '{reader}'"
        table.add_row(f"then a plain reader: {name}", _seen(delta["plain_readers"][reader]),
                      _seen(hive["plain_readers"][reader]))
    table.add_row("its own reader then: rows (of them the re-run's)",
                  _live_note(delta["live"]), _live_note(hive["live"]))
    table.add_row("data files on disk then", _disk_note(delta["on_disk"]) + " (no vacuum)",
                  _disk_note(hive["on_disk"]))
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.formats", description=__doc__)
    parser.add_argument("--child", nargs=2, metavar=("TASK", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(CHILD_TASKS, *args.child)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    try:
        results = {"deltalake": deltalake.__version__, "delta": _run_delta(work),
                   "hive": _run_hive(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str) + "\n")
    _print(results)


if __name__ == "__main__":
    main()
