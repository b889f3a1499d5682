"""Writing rows as Parquet fragments that appear whole, and reading a table back.

A fragment is ``<table>/model=<m>/date=<d>/part-<fragment_id>-0.parquet``. Its name is
derived by the caller from what it holds, so writing it again replaces it instead of
duplicating it. It appears whole or not at all: locally it is written under a ``_tmp-``
name (which every reader skips) and renamed; on S3 one PUT (or one completed multipart
upload, which is how pyarrow writes large objects) is atomic already.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.location import PARTITIONING, OutputLocation, partition_dir, table_dir
from store.tables import PARTITION_COLUMNS, empty_table, file_schema, to_table

__all__ = ["WRITTEN_AT_KEY", "read_table", "write_atomically", "write_fragment", "written_at"]

logger = logging.getLogger(__name__)

# Schema metadata key holding time.time_ns() at write; orders fragments for compaction
# because S3 LastModified has one-second resolution. Compacted files carry their inputs' max.
WRITTEN_AT_KEY = b"modulate:written_at_ns"
_FRAGMENT_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


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
        table_name: a key of ``store.tables.TABLES``.
        rows: row dicts; validated by ``store.tables.to_table``.
        fragment_id: derived by the caller from the rows' content and config, so writing
            the same fragment again replaces the same files.

    Returns:
        The number of rows written (0 for no rows, which writes nothing).
    """
    if not _FRAGMENT_ID_RE.fullmatch(fragment_id):
        raise ValueError("fragment_id must be letters, digits, '-' or '_'")
    if not rows:
        return 0
    table = to_table(table_name, rows)
    metadata = {WRITTEN_AT_KEY: str(time.time_ns()).encode()}
    fs, base = location.filesystem()
    columns = file_schema(table_name).names
    for model, date in _partitions(table):
        mask = pc.and_(pc.equal(table["model"], model), pc.equal(table["date"], date))
        part = table.filter(mask).select(columns).replace_schema_metadata(metadata)
        directory = partition_dir(base, table_name, model, date)
        write_atomically(fs, part, f"{directory}/part-{fragment_id}-0.parquet")
    logger.info(
        "wrote %d %s rows to %s (fragment %s)",
        table.num_rows,
        table_name,
        location.uri(table_name),
        fragment_id,
    )
    return table.num_rows


def write_atomically(fs: pafs.FileSystem, table: pa.Table, path: str) -> None:
    """Write ``table`` to ``path`` so that a reader sees all of it or nothing."""
    directory, name = path.rsplit("/", 1)
    fs.create_dir(directory, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        temp = f"{directory}/_tmp-{uuid.uuid4().hex}-{name}"
        try:
            pq.write_table(table, temp, filesystem=fs)
            fs.move(temp, path)
        except BaseException:
            _remove_quietly(fs, temp)
            raise
    else:
        pq.write_table(table, path, filesystem=fs)


def written_at(schema: pa.Schema, fallback_ns: int) -> int:
    """When a file was written, from its metadata (or ``fallback_ns``, its mtime)."""
    stamp = (schema.metadata or {}).get(WRITTEN_AT_KEY)
    return int(stamp) if stamp else fallback_ns


def read_table(location: OutputLocation, table_name: str) -> pa.Table:
    """Read a whole table with its full schema (for summaries and the demo)."""
    fs, base = location.filesystem()
    path = table_dir(base, table_name)
    empty = empty_table(table_name)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return empty
    # The explicit schema reads files from older schema versions with new columns as null.
    dataset = ds.dataset(
        path, schema=empty.schema, format="parquet", filesystem=fs, partitioning=PARTITIONING
    )
    return dataset.to_table()


def _partitions(table: pa.Table) -> list[tuple[str, str]]:
    pairs = table.group_by(list(PARTITION_COLUMNS), use_threads=False).aggregate([])
    return sorted(zip(pairs["model"].to_pylist(), pairs["date"].to_pylist(), strict=True))


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass
