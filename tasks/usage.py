"""The `usage` table: one row per completed call, partitioned by the day the call finished.

The `files` ledger is partitioned by the day each audio object was last modified, so the
calls of one billing period can sit in any of its partitions. `usage` repeats the few
columns a budget needs under `model=<billed model>/date=<finish day>/`, so reading a
period's usage reads that period's partitions and nothing older. Rows ride with a file's
result rows (written before its ledger row), so usage is as durable as the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from store.location import PARTITIONING, OutputLocation, read_data_files
from store.tables import TABLES

__all__ = ["USAGE_TABLE", "read_daily_usage", "usage_models", "usage_row"]

USAGE_TABLE = "usage"
_MODEL_PREFIX = "model="


def usage_row(ledger: Mapping[str, Any], billed_model: str) -> dict[str, Any]:
    """The usage row of a completed file, from its ledger row.

    Args:
        ledger: The file's `files` row, finished (`finished_at` set).
        billed_model: The model whose monthly limit the call used (a batch run's large
            files are billed to the matching streaming model).
    """
    finished = ledger["finished_at"]
    return {
        "file_id": ledger["file_id"],
        "config_hash": ledger["config_hash"],
        "audio_duration_ms": ledger["audio_duration_ms"],
        "finished_at": finished,
        "flow_run_id": ledger["flow_run_id"],
        "model": billed_model,
        "date": finished.date().isoformat(),
    }


def read_daily_usage(location: OutputLocation, model: str, days: Iterable[date]) -> dict[date, int]:
    """Audio milliseconds used per finish day, for the given days only.

    Only the `date=` partitions of those days are listed and read (listed again when another
    run's compaction deleted files listed). A call counted twice (uncompacted fragments
    after a crash) counts once: the last row per file and config wins.

    Args:
        location: The dataset root.
        model: The billed model.
        days: The UTC days to read.

    Returns:
        Milliseconds per day, for the days that have usage.
    """
    fs, base = location.filesystem()
    root = f"{base}/{USAGE_TABLE}"
    directories = [f"{root}/model={model}/date={day.isoformat()}" for day in sorted(set(days))]
    table = read_data_files(fs, directories, lambda paths: _read_usage(fs, root, paths))
    if table is None:
        return {}
    # One charge per file, config and day; a re-send on another day was charged again.
    calls = table.group_by(["file_id", "config_hash", "date"], use_threads=False).aggregate(
        [("audio_duration_ms", "max")]
    )
    per_day = pa.table(
        {"day": calls.column("date"), "ms": pc.fill_null(calls.column("audio_duration_ms_max"), 0)}
    ).group_by("day").aggregate([("ms", "sum")])
    return {
        date.fromisoformat(day): int(ms)
        for day, ms in zip(
            per_day.column("day").to_pylist(), per_day.column("ms_sum").to_pylist(), strict=True
        )
    }


def _read_usage(fs: pafs.FileSystem, root: str, paths: list[str]) -> pa.Table | None:
    if not paths:
        return None
    dataset = ds.dataset(
        paths, schema=TABLES[USAGE_TABLE][0], format="parquet", filesystem=fs,
        partition_base_dir=root, partitioning=PARTITIONING,
    )
    return dataset.to_table(columns=["file_id", "config_hash", "date", "audio_duration_ms"])


def usage_models(location: OutputLocation) -> list[str]:
    """The models the usage table has partitions for (one listing of its top level)."""
    fs, base = location.filesystem()
    selector = pafs.FileSelector(f"{base}/{USAGE_TABLE}", allow_not_found=True)
    return sorted(
        info.base_name.removeprefix(_MODEL_PREFIX)
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory and info.base_name.startswith(_MODEL_PREFIX)
    )
