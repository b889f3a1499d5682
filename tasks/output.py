"""Where the Parquet goes: Hive-partitioned datasets under a local directory or ``s3://``.

Fragments are written under deterministic names so a rerun overwrites instead of
duplicating; ``compact`` folds a partition's fragments into one file with one row per key;
``read_ledger`` streams the ``files`` table to tell a rerun what is already done.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import SecretStr

from tasks.schemas import PARTITION_COLUMNS, TABLES, check_partition, empty_table, to_table

__all__ = ["OutputLocation", "compact", "read_ledger", "read_table", "write_fragment"]

logger = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
# Schema metadata key holding time.time_ns() at write; orders fragments for compaction
# because S3 LastModified has one-second resolution. Compacted files carry their inputs' max.
WRITTEN_AT_KEY = b"modulate:written_at_ns"
LEDGER_BATCH_ROWS = 65_536

# Partition columns are kept out of the files (they live in the path) because pandas refuses
# a dataset that has them in both. What each reader makes of them, checked in
# tests/test_output.py (keep in sync with the README's data schema section):
#   pyarrow.dataset(partitioning="hive"), read_table(): model string, date string
#   pandas.read_parquet(dir):                           model category, date category
#   DuckDB read_parquet(..., hive_partitioning=true):   model VARCHAR, date DATE
#   polars.read_parquet(..., hive_partitioning=True):   model String, date Date
_PARTITIONING = ds.partitioning(
    pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS]), flavor="hive"
)
_FRAGMENT_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class OutputLocation:
    """The dataset root, a local directory or ``s3://bucket/prefix``, and how to reach it.

    Keys are SecretStr (a plain str is wrapped), so repr and logs never show them.
    """

    root: str
    s3_endpoint_url: str | None = None
    aws_access_key_id: SecretStr | str | None = None
    aws_secret_access_key: SecretStr | str | None = None
    region: str | None = None

    def __post_init__(self) -> None:
        for name in ("aws_access_key_id", "aws_secret_access_key"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, SecretStr(value))

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """Return the filesystem and the root path on it (``bucket/prefix`` for S3).

        A local root is made absolute and created.
        """
        if not self.is_s3:
            path = os.path.abspath(self.root)
            os.makedirs(path, exist_ok=True)
            return pafs.LocalFileSystem(), path
        base = self.root.removeprefix("s3://").strip("/")
        if not base:
            raise ValueError("an s3:// root needs a bucket")
        kwargs: dict[str, Any] = {"region": self.region or DEFAULT_REGION}
        if self.s3_endpoint_url:
            endpoint = urlparse(self.s3_endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        access_key, secret_key = self.aws_access_key_id, self.aws_secret_access_key
        if access_key and secret_key:
            kwargs["access_key"] = _reveal(access_key)
            kwargs["secret_key"] = _reveal(secret_key)
        return pafs.S3FileSystem(**kwargs), base

    def uri(self, table: str) -> str:
        """Return where ``table`` lives, for display (no credentials)."""
        root = self.root.rstrip("/") if self.is_s3 else os.path.abspath(self.root)
        return f"{root}/{table}"


def write_fragment(
    location: OutputLocation,
    table_name: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    fragment_id: str,
) -> int:
    """Write rows as ``<table>/model=<m>/date=<d>/part-<fragment_id>-0.parquet``.

    Args:
        location: the dataset root.
        table_name: a key of ``tasks.schemas.TABLES``.
        rows: row dicts; validated by ``tasks.schemas.to_table``.
        fragment_id: derived by the caller from the chunk's content and config, so writing
            the same fragment again overwrites the same files.

    Returns:
        The number of rows written (0 for no rows, which writes nothing).
    """
    if not _FRAGMENT_ID_RE.fullmatch(fragment_id):
        raise ValueError("fragment_id must be letters, digits, '-' or '_'")
    if not rows:
        return 0
    table = to_table(table_name, rows)
    table = table.replace_schema_metadata({WRITTEN_AT_KEY: str(time.time_ns()).encode()})
    fs, base = location.filesystem()
    ds.write_dataset(
        table,
        f"{base}/{table_name}",
        format="parquet",
        filesystem=fs,
        partitioning=_PARTITIONING,
        basename_template=f"part-{fragment_id}-{{i}}.parquet",
        existing_data_behavior="overwrite_or_ignore",
        preserve_order=True,
    )
    logger.info(
        "wrote %d %s rows to %s (fragment %s)",
        table.num_rows,
        table_name,
        location.uri(table_name),
        fragment_id,
    )
    return table.num_rows


def compact(location: OutputLocation, table_name: str, model: str, dates: Iterable[str]) -> None:
    """Fold each ``model=<model>/date=<d>`` partition into one file, one row per key.

    The surviving row is the one with the latest ``finished_at`` (files table), then the one
    from the most recently written file. Inputs are deleted only after the output is
    written, and only the files that were read, so a crash leaves at worst duplicates that
    the next call removes, and fragments written meanwhile are kept.

    Args:
        location: the dataset root.
        table_name: a key of ``tasks.schemas.TABLES``.
        model: the ``model=`` partition.
        dates: the ``date=`` partitions to compact; missing ones are skipped.
    """
    _table_spec(table_name)
    fs, base = location.filesystem()
    for date in sorted(set(dates)):
        check_partition(model, date)
        directory = f"{base}/{table_name}/model={model}/date={date}"
        _compact_partition(fs, directory, table_name)


def read_ledger(location: OutputLocation, model: str, config_hash: str) -> dict[str, str]:
    """Return ``file_id -> status`` from the files table for one model and config.

    Streams projected, filtered batches. Where uncompacted fragments hold several rows for a
    file, ``completed`` wins, otherwise the row with the latest ``finished_at``.

    Args:
        location: the dataset root.
        model: the ``model=`` partition to read.
        config_hash: the job config whose rows count.

    Returns:
        ``file_id -> status``; empty when the files table does not exist yet.
    """
    dataset = _open_dataset(location, "files")
    if dataset is None:
        return {}
    scanner = dataset.scanner(
        columns=["file_id", "status", "finished_at"],
        filter=(pc.field("model") == model) & (pc.field("config_hash") == config_hash),
        batch_size=LEDGER_BATCH_ROWS,
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


def read_table(location: OutputLocation, table_name: str) -> pa.Table:
    """Read a whole table with its full schema (for summaries and the demo)."""
    dataset = _open_dataset(location, table_name)
    if dataset is None:
        return empty_table(table_name)
    return dataset.to_table()


def _reveal(secret: SecretStr | str) -> str:
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret


def _table_spec(table_name: str) -> tuple[pa.Schema, tuple[str, ...]]:
    try:
        return TABLES[table_name]
    except KeyError:
        raise ValueError(f"unknown table {table_name!r}") from None


def _file_schema(schema: pa.Schema) -> pa.Schema:
    """The schema stored inside the files: partition columns live in the path instead."""
    for name in PARTITION_COLUMNS:
        schema = schema.remove(schema.get_field_index(name))
    return schema


def _open_dataset(location: OutputLocation, table_name: str) -> ds.Dataset | None:
    schema, _ = _table_spec(table_name)
    fs, base = location.filesystem()
    path = f"{base}/{table_name}"
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    # The explicit schema reads files from older schema versions with new columns as null.
    return ds.dataset(
        path, schema=schema, format="parquet", filesystem=fs, partitioning=_PARTITIONING
    )


def _is_data_file(info: pafs.FileInfo) -> bool:
    name = info.base_name
    return (
        info.type == pafs.FileType.File
        and name.endswith(".parquet")
        and not name.startswith(("_", "."))
    )


def _compact_partition(fs: pafs.FileSystem, directory: str, table_name: str) -> None:
    schema, keys = TABLES[table_name]
    file_schema = _file_schema(schema)
    selector = pafs.FileSelector(directory, allow_not_found=True)
    inputs = [info for info in fs.get_file_info(selector) if _is_data_file(info)]
    if len(inputs) < 2:
        return
    loaded: list[tuple[tuple[int, str], pa.Table]] = []
    for info in inputs:
        with fs.open_input_file(info.path) as handle:
            table = pq.read_table(handle)
        unknown = set(table.column_names) - set(file_schema.names)
        if unknown:
            logger.warning(
                "not compacting %s: %s has columns this version does not know",
                directory,
                info.base_name,
            )
            return
        written_at = (table.schema.metadata or {}).get(WRITTEN_AT_KEY)
        order = int(written_at) if written_at else (info.mtime_ns or 0)
        loaded.append(((order, info.base_name), _conform(table, file_schema)))
    loaded.sort(key=lambda item: item[0])

    parts = []
    for rank, (_, table) in enumerate(loaded):
        table = table.append_column("_rank", pa.array([rank] * table.num_rows, pa.int32()))
        parts.append(table.append_column("_row", pa.array(range(table.num_rows), pa.int64())))
    combined = pa.concat_tables(parts)
    sort_keys = [("_rank", "ascending"), ("_row", "ascending")]
    if table_name == "files":
        epoch = pa.scalar(0, type=schema.field("finished_at").type)
        combined = combined.append_column(
            "_finished", pc.fill_null(combined.column("finished_at"), epoch)
        )
        sort_keys.insert(0, ("_finished", "ascending"))
    combined = combined.sort_by(sort_keys)
    combined = combined.append_column("_pos", pa.array(range(combined.num_rows), pa.int64()))
    winners = combined.group_by(list(keys), use_threads=False).aggregate([("_pos", "max")])
    result = combined.take(winners.column("_pos_max"))
    result = result.select(file_schema.names).sort_by([(key, "ascending") for key in keys])
    newest = max(order for (order, _), _ in loaded)
    result = result.replace_schema_metadata({WRITTEN_AT_KEY: str(newest).encode()})

    names = sorted(info.base_name for info in inputs)
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    target = f"{directory}/part-compacted-{digest}-0.parquet"
    if isinstance(fs, pafs.LocalFileSystem):
        # Readers skip "_" names; the rename makes the file appear whole or not at all.
        temp = f"{directory}/_tmp-compacted-{digest}.parquet"
        pq.write_table(result, temp, filesystem=fs)
        fs.move(temp, target)
    else:
        pq.write_table(result, target, filesystem=fs)  # an S3 PUT is atomic
    for info in inputs:
        if info.path == target:
            continue
        try:
            fs.delete_file(info.path)
        except FileNotFoundError:
            pass  # a concurrent compaction of the same inputs got there first
    logger.info(
        "compacted %d files (%d rows) into %d rows in %s",
        len(inputs),
        combined.num_rows,
        result.num_rows,
        directory,
    )


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give a file's table the current schema: columns added since it was written are null."""
    columns = [
        table.column(field.name).cast(field.type)
        if field.name in table.column_names
        else pa.nulls(table.num_rows, field.type)
        for field in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
