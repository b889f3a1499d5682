"""Fold a partition's new fragments into compacted segments: one row per key, bounded memory.

A partition holds compacted *segments* (``part-compacted-<digest>-0.parquet``; together one
row per key, and for each file the rows of one attempt) and new *fragments* (everything
else). Compaction

1. reads the small columns (keys, attempt, status, finished_at) of the fragments, and of
   the segments only the rows of keys the fragments touch, and picks each key's winner by
   the rule of store/winners.py (child tables ask the ``files`` partition of the same date);
2. rewrites, streaming record batches into one new segment, the fragments and only those
   segments that hold a row that lost; every other segment stays as it is. When more than
   ``MAX_SEGMENTS`` would remain, the smallest are merged into the new one as well, so a
   partition holds a few segments of geometrically growing size;
3. writes the new segment whole (store/fragments.py), then deletes exactly the inputs it
   rewrote.

Fragments are folded the oldest ``FRAGMENTS_PER_ROUND`` at a time (a backfill's day holds
10k), as that many runs would have. So memory is a record batch plus a round's touched keys,
and time is the new rows plus a scan of the segments' key columns, not a rewrite of the
partition. A crash at any point leaves
duplicates at worst, which the next compaction removes; rows are never lost, because an
input is deleted only after the rows that survive from it are written. One compactor runs
per partition at a time (store/locks.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.fragments import WRITTEN_AT_KEY, written_at
from store.location import OutputLocation, data_files, partition_dir, read_data_files
from store.locks import partition_lock
from store.tables import CHILD_TABLES, LEDGER_TABLE, file_schema, group_columns
from store.winners import child_winners, files_winners, last_of_each

__all__ = ["MAX_SEGMENTS", "SEGMENT_PREFIX", "compact"]

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "part-compacted-"
MAX_SEGMENTS = 8
FRAGMENTS_PER_ROUND = 1_000
# Fragments are read once, whole, and kept in memory while their files total at most this;
# the rest are read by each of the three passes. A run's end compacts hundreds of small
# fragments (a flush is C files): at 2,000 files, four partitions of 80 took 2.0 s read
# three times and 0.9 s read once (BENCHMARKS.md, session 9).
FRAGMENT_READ_BYTES = 16 * 2**20
BATCH_ROWS = 65_536
ROW_GROUP_ROWS = 65_536
# A second compactor of the same partition waits this long, then leaves the partition to
# the next run (nothing is lost: its fragments stay readable and are compacted later).
LOCK_WAIT_SECONDS = 600.0
# A segment's metadata: when the compaction that wrote it began. Ledger rows written after
# that (less RECHECK_NS: a write that began before it may have ended after it read the
# ledger) are decided again at a child table's next compaction.
COMPACTED_AT_KEY = b"modulate:compacted_at_ns"
RECHECK_NS = 60 * 10**9
_SEP = "\x1f"
_ATTEMPT_COLUMNS = ("status", "finished_at", "flow_run_id")
_NO_LEDGER = pa.table({
    "_gk": pa.array([], pa.string()), "_attempt": pa.array([], pa.string()),
    "_completed": pa.array([], pa.int8()), "_finished": pa.array([], pa.int64()),
    "_latest": pa.array([], pa.int64()),
})


def compact(
    location: OutputLocation, table_name: str, model: str, dates: Iterable[str]
) -> None:
    """Fold the new fragments of each ``model=<model>/date=<d>`` partition into segments.

    Args:
        location: the dataset root.
        table_name: a key of ``store.tables.TABLES``.
        model: the ``model=`` partition.
        dates: the ``date=`` partitions to compact; missing ones are skipped.
    """
    schema = file_schema(table_name)
    fs, base = location.filesystem()
    for date in sorted(set(dates)):
        directory = partition_dir(base, table_name, model, date)
        if not data_files(fs, directory):
            continue
        with partition_lock(location, fs, directory, wait_seconds=LOCK_WAIT_SECONDS) as held:
            if not held:
                logger.warning(
                    "not compacting %s: another compaction held it for %.0f s",
                    directory,
                    LOCK_WAIT_SECONDS,
                )
                continue
            _Partition(fs, base, table_name, model, date, schema).compact()


@dataclasses.dataclass
class _Source:
    info: pafs.FileInfo
    order: int
    written_ns: int
    segment: bool
    columns: frozenset[str]
    compacted_ns: int  # when the compaction that wrote a segment began


class _Partition:
    """One compaction of one partition (held under its lock)."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        base: str,
        table_name: str,
        model: str,
        date: str,
        schema: pa.Schema,
    ) -> None:
        self.fs = fs
        self.base = base
        self.table_name = table_name
        self.model = model
        self.date = date
        self.schema = schema
        self.directory = partition_dir(base, table_name, model, date)
        self.group = group_columns(table_name)
        self._read: dict[str, pa.Table] = {}  # path -> a fragment read whole
        self._read_bytes = 0  # the sizes of their files

    def compact(self) -> None:
        self.started_ns = time.time_ns()
        sources = self._sources()
        if sources is None:
            return
        first = True
        while True:
            fragments = [s for s in sources if not s.segment]
            segments = [s for s in sources if s.segment]
            if not fragments and len(segments) <= MAX_SEGMENTS:
                return
            # A backfill's day is 10k fragments: folded the oldest FRAGMENTS_PER_ROUND at a
            # time, as that many runs would, memory is a round's keys and not the day's.
            fragments, later = fragments[:FRAGMENTS_PER_ROUND], fragments[FRAGMENTS_PER_ROUND:]
            touched = self._touched(fragments)
            if first and self.table_name in CHILD_TABLES and segments:
                # Ledger changes decide the old segments' rows again, once: the later
                # rounds' segments were written after them.
                since = max(s.compacted_ns for s in segments)
                touched = self._with_ledger_changes(touched, since)
            first = False
            keep_rows, lost = self._winners(segments + fragments, touched)
            rewrite = fragments + [s for s in segments if s.order in lost]
            kept = [s for s in segments if s.order not in lost]
            if len(kept) + 1 > MAX_SEGMENTS:
                kept.sort(key=lambda s: s.info.size or 0)
                merge = len(kept) + 1 - MAX_SEGMENTS // 2
                rewrite += kept[:merge]
            written = self._rewrite(rewrite, touched, keep_rows)
            if not later:
                return
            gone = {s.info.path for s in rewrite}
            rest = [s for s in sources if s.info.path not in gone]
            sources = _in_order([*rest, *([written] if written else [])])

    def _sources(self) -> list[_Source] | None:
        found = []
        for info in data_files(self.fs, self.directory):
            segment = info.base_name.startswith(SEGMENT_PREFIX)
            size = info.size or 0
            with self.fs.open_input_file(info.path) as handle:
                if segment or self._read_bytes + size > FRAGMENT_READ_BYTES:
                    stored = pq.read_schema(handle)
                else:
                    # One thread: pyarrow's pool costs more than a fragment of a few KB.
                    whole = pq.ParquetFile(handle).read(use_threads=False)
                    stored = whole.schema
                    self._read[info.path] = whole
                    self._read_bytes += size
            unknown = set(stored.names) - set(self.schema.names)
            if unknown:
                logger.warning(
                    "not compacting %s: %s has columns this version does not know",
                    self.directory,
                    info.base_name,
                )
                return None
            stamp = written_at(stored, info.mtime_ns or 0)
            compacted = int((stored.metadata or {}).get(COMPACTED_AT_KEY, stamp))
            names = frozenset(stored.names)
            found.append((stamp, info.base_name, info, segment, names, compacted))
        return _in_order([
            _Source(info, 0, stamp, segment, names, compacted)
            for stamp, _, info, segment, names, compacted in found
        ])

    # pass 1: who wins

    def _touched(self, fragments: list[_Source]) -> pa.Array:
        keys = [
            pc.unique(_group_key(batch, self.group))
            for source in fragments
            for batch in self._batches(source, self.group)
        ]
        return _unique(keys)

    def _with_ledger_changes(self, touched: pa.Array, since_ns: int) -> pa.Array:
        """Add the keys of ``files`` rows written since this table's segments were.

        A new ledger row can change a key's winner with no new child rows (an attempt that
        completed with none in this table): its rows in the segments are decided again.
        """
        directory = partition_dir(self.base, LEDGER_TABLE, self.model, self.date)
        schema = file_schema(LEDGER_TABLE)

        def changed_keys(paths: list[str]) -> list[pa.Array]:
            keys = [touched]
            for path in paths:
                with self.fs.open_input_file(path) as handle:
                    reader = pq.ParquetFile(handle)
                    # Files from before the stamp existed fall back to their mtime.
                    stamp = written_at(reader.schema_arrow, 0) or (
                        self.fs.get_file_info(path).mtime_ns or 0
                    )
                    if stamp <= since_ns - RECHECK_NS:
                        continue
                    columns = list(self.group)
                    for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                        batch = pa.RecordBatch.from_arrays(
                            [batch[c].cast(schema.field(c).type) for c in self.group],
                            names=columns,
                        )
                        keys.append(pc.unique(_group_key(batch, self.group)))
            return keys

        # Another run may be compacting the ledger meanwhile: read_data_files lists again.
        return _unique(read_data_files(self.fs, [directory], changed_keys))

    def _winners(
        self, sources: list[_Source], touched: pa.Array
    ) -> tuple[dict[int, pa.Array], set[int]]:
        """For each source, which of its touched rows survive; and the segments that lose any.

        Rows are named by position for ``files`` and ``platform_results`` (one row per key
        per source), by ``key SEP attempt`` for child tables (all rows of the attempt).
        """
        if len(touched) == 0:
            return {}, set()
        if self.table_name in CHILD_TABLES:
            return self._child_winners(sources, touched)
        candidates = []
        columns = (*self.group, *(c for c in _ATTEMPT_COLUMNS if c in self.schema.names))
        for source in sources:
            offset = 0
            for batch in self._batches(source, columns):
                gk = _group_key(batch, self.group)
                rows = pa.array(np.arange(offset, offset + batch.num_rows), pa.int64())
                offset += batch.num_rows
                table = pa.table(
                    {
                        "_gk": gk,
                        "_source": pa.array(np.full(batch.num_rows, source.order), pa.int32()),
                        "_row": rows,
                        **{c: batch[c] for c in columns if c not in self.group},
                    }
                )
                if source.segment:
                    table = table.filter(pc.is_in(gk, value_set=touched))
                candidates.append(table)
        if not candidates:
            return {}, set()
        table = pa.concat_tables(candidates)
        if self.table_name == LEDGER_TABLE:
            winners = files_winners(table, ("_gk",), ("_source", "_row"))
        else:  # no attempts: the most recently written row of the key
            ordered = table.sort_by([("_source", "ascending"), ("_row", "ascending")])
            winners, _ = last_of_each(ordered, ["_gk"])
        keep = _by_source(winners["_source"].to_numpy(), winners["_row"])
        per_source = table.group_by(["_source"], use_threads=False).aggregate([("_row", "count")])
        won = {order: len(rows) for order, rows in keep.items()}
        lost = {
            int(order)
            for order, count in zip(
                per_source["_source"].to_pylist(), per_source["_row_count"].to_pylist(), strict=True
            )
            if won.get(order, 0) < count
        }
        return keep, lost

    def _child_winners(
        self, sources: list[_Source], touched: pa.Array
    ) -> tuple[dict[int, pa.Array], set[int]]:
        found = []
        for source in sources:
            distinct = []
            for batch in self._batches(source, (*self.group, "flow_run_id")):
                gk = _group_key(batch, self.group)
                pairs = pa.table({"_gk": gk, "_attempt": pc.fill_null(batch["flow_run_id"], "")})
                if source.segment:
                    pairs = pairs.filter(pc.is_in(gk, value_set=touched))
                distinct.append(pairs.group_by(["_gk", "_attempt"]).aggregate([]))
            if not distinct:
                continue
            pairs = pa.concat_tables(distinct)
            pairs = pairs.group_by(["_gk", "_attempt"], use_threads=False).aggregate([])
            n = pairs.num_rows
            pairs = pairs.append_column("_source", pa.array(np.full(n, source.order), pa.int32()))
            found.append(
                pairs.append_column("_written", pa.array(np.full(n, source.written_ns), pa.int64()))
            )
        if not found:
            return {}, set()
        attempts = pa.concat_tables(found)
        chosen = child_winners(self._ledger(touched), attempts)
        names = pc.binary_join_element_wise(chosen["_gk"], chosen["_attempt"], _SEP)
        keep = _by_source(chosen["_source"].to_numpy(), names)
        # A source loses when any attempt in it is not its key's chosen one.
        chosen_ids = pc.binary_join_element_wise(names, chosen["_source"].cast(pa.string()), _SEP)
        all_ids = pc.binary_join_element_wise(
            attempts["_gk"], attempts["_attempt"], attempts["_source"].cast(pa.string()), _SEP
        )
        lost_rows = pc.invert(pc.is_in(all_ids, value_set=chosen_ids.combine_chunks()))
        lost = set(pc.unique(attempts["_source"].filter(lost_rows)).to_pylist())
        return keep, lost

    def _ledger(self, touched: pa.Array) -> pa.Table:
        """The ``files`` winner of every touched key (``_gk`` and the rank columns), from that
        table's partition of this date."""
        if len(touched) == 0:
            return _NO_LEDGER
        directory = partition_dir(self.base, LEDGER_TABLE, self.model, self.date)
        file_ids = pc.unique(pc.list_element(pc.split_pattern(touched, _SEP, max_splits=1), 0))

        def read(paths: list[str]) -> pa.Table | None:
            if not paths:
                return None
            dataset = ds.dataset(
                paths, schema=file_schema(LEDGER_TABLE), format="parquet", filesystem=self.fs
            )
            return dataset.to_table(
                columns=["file_id", "config_hash", *_ATTEMPT_COLUMNS],
                filter=pc.field("file_id").isin(file_ids),
                batch_size=BATCH_ROWS,
            )

        # Another run may be compacting the ledger meanwhile: read_data_files lists again.
        table = read_data_files(self.fs, [directory], read)
        if table is None or table.num_rows == 0:
            return _NO_LEDGER
        winners = files_winners(table, ("file_id", "config_hash"))
        return winners.append_column("_gk", _group_key(winners, ("file_id", "config_hash")))

    # pass 2: write what survives

    def _rewrite(
        self, rewrite: list[_Source], touched: pa.Array, keep: dict[int, pa.Array]
    ) -> _Source | None:
        """Write what survives of ``rewrite`` as one segment; return it (None if empty)."""
        if not rewrite:
            return None
        names = sorted(s.info.base_name for s in rewrite)
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        target = f"{self.directory}/{SEGMENT_PREFIX}{digest}-0.parquet"
        newest = max(s.written_ns for s in rewrite)
        schema = self.schema.with_metadata(
            {WRITTEN_AT_KEY: str(newest).encode(), COMPACTED_AT_KEY: str(self.started_ns).encode()}
        )
        # A temporary name on S3 too: a streamed upload that fails half-way must never be
        # completed under a name readers see; the rename there is one server-side copy.
        path = f"{self.directory}/_tmp-{uuid.uuid4().hex}.parquet"
        rows_out = 0
        stream = None
        writer: pq.ParquetWriter | None = None
        try:
            for batch in self._surviving(rewrite, touched, keep):
                if writer is None:
                    stream = self.fs.open_output_stream(path)
                    writer = pq.ParquetWriter(stream, schema, compression="snappy")
                writer.write_table(pa.Table.from_batches([batch]), row_group_size=ROW_GROUP_ROWS)
                rows_out += batch.num_rows
        except BaseException:
            if writer is not None:
                writer.close()
                stream.close()
            _remove_quietly(self.fs, path)
            raise
        written = None
        if writer is not None:
            writer.close()
            stream.close()
            self.fs.move(path, target)
            written = _Source(
                self.fs.get_file_info(target), 0, newest, True, frozenset(schema.names),
                self.started_ns,
            )
        for source in rewrite:
            if self._read.pop(source.info.path, None) is not None:
                self._read_bytes -= source.info.size or 0
            if source.info.path != target:
                _remove_quietly(self.fs, source.info.path)
        logger.info(
            "compacted %d files into %d rows in %s",
            len(rewrite),
            rows_out,
            self.directory,
        )
        return written

    def _surviving(
        self, rewrite: list[_Source], touched: pa.Array, keep: dict[int, pa.Array]
    ) -> Iterator[pa.RecordBatch]:
        """The rows of ``rewrite`` that survive, in batches of at most ``ROW_GROUP_ROWS``."""
        child = self.table_name in CHILD_TABLES
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for source in sorted(rewrite, key=lambda s: s.order):
            wanted = keep.get(source.order, pa.array([], pa.string() if child else pa.int64()))
            # Every key of a fragment is touched; only a segment's rows need the (costly:
            # a hash of every touched key, per batch) test, and there are few segments.
            untouched = touched if source.segment else None
            offset = 0
            for batch in self._batches(source, tuple(self.schema.names)):
                gk = _group_key(batch, self.group)
                if child:
                    attempt = pc.fill_null(batch["flow_run_id"], "")
                    named = pc.binary_join_element_wise(gk, attempt, _SEP)
                else:
                    named = pa.array(np.arange(offset, offset + batch.num_rows), pa.int64())
                offset += batch.num_rows
                survives = pc.is_in(named, value_set=wanted)
                if untouched is not None:
                    survives = pc.or_(pc.invert(pc.is_in(gk, value_set=untouched)), survives)
                kept = batch.filter(survives)
                if kept.num_rows:  # an empty batch is never yielded
                    pending.append(kept)
                    pending_rows += kept.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    yield from pa.Table.from_batches(pending).combine_chunks().to_batches()
                    pending, pending_rows = [], 0
        if pending:
            yield from pa.Table.from_batches(pending).combine_chunks().to_batches()

    def _batches(self, source: _Source, columns: tuple[str, ...]) -> Iterator[pa.RecordBatch]:
        """Record batches of ``columns`` in the current schema (columns added since: null)."""
        present = [c for c in columns if c in source.columns]
        whole = self._read.get(source.info.path)
        if whole is not None:
            yield from self._conformed(whole.select(present).to_batches(BATCH_ROWS), columns)
            return
        with self.fs.open_input_file(source.info.path) as handle:
            reader = pq.ParquetFile(handle)
            batches = reader.iter_batches(batch_size=BATCH_ROWS, columns=present)
            yield from self._conformed(batches, columns)

    def _conformed(
        self, batches: Iterable[pa.RecordBatch], columns: tuple[str, ...]
    ) -> Iterator[pa.RecordBatch]:
        fields = [self.schema.field(c) for c in columns]
        for batch in batches:
            names = set(batch.schema.names)
            arrays = [
                batch[f.name].cast(f.type) if f.name in names else pa.nulls(batch.num_rows, f.type)
                for f in fields
            ]
            yield pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _in_order(sources: list[_Source]) -> list[_Source]:
    """Numbered oldest first (by the time each was written, then name): a later source wins
    a tie."""
    ordered = sorted(sources, key=lambda s: (s.written_ns, s.info.base_name))
    return [dataclasses.replace(s, order=order) for order, s in enumerate(ordered)]


def _by_source(sources: np.ndarray, rows: pa.Array | pa.ChunkedArray) -> dict[int, pa.Array]:
    """``rows`` split by their source: one sort, not a scan of every row per source (a
    backfill's partition has 10k fragments)."""
    order = np.argsort(sources, kind="stable")
    found, starts = np.unique(sources[order], return_index=True)
    taken = pc.take(rows, pa.array(order))
    if isinstance(taken, pa.ChunkedArray):
        taken = taken.combine_chunks()
    bounds = [*starts.tolist(), len(order)]
    return {
        int(source): taken.slice(bounds[i], bounds[i + 1] - bounds[i])
        for i, source in enumerate(found.tolist())
    }


def _unique(arrays: list[pa.Array]) -> pa.Array:
    if not arrays:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array(arrays, pa.string()).combine_chunks())


def _group_key(batch: pa.RecordBatch, group: tuple[str, ...]) -> pa.Array:
    return pc.binary_join_element_wise(*(batch[c] for c in group), _SEP)


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass  # a compaction before this one's crash removed it already
