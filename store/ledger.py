"""The ``files`` ledger as a run reads it: which files of one model and config are done.

A run asks ``LedgerLookup.status(file_id, date)`` for each object it lists. The ``date`` is
the object's LastModified date, the ``files`` partition its row lives in, so the lookup reads
a partition the first time the listing reaches one of its dates and never the others: the
cost of start-up follows the run, not the history. What it keeps of a partition is compact:
the winning status of each file (store/winners.py), as a sorted array of 64-bit file ids
and one status code each (9 bytes a file), read with only the columns it needs and the
config pushed down as a filter.
"""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from store.location import OutputLocation, partition_dir, read_data_files, table_dir
from store.tables import FILE_ID_HEX_CHARS, FILE_STATUSES, LEDGER_TABLE, file_schema
from store.winners import files_winners

__all__ = ["FINISHED", "LEDGER_COLUMNS", "LedgerLookup", "read_ledger"]

FINISHED = frozenset({"completed", "skipped"})  # statuses a rerun does not send again

LEDGER_COLUMNS = ("file_id", "status", "finished_at", "flow_run_id")
_STATUSES = tuple(sorted(FILE_STATUSES))
_HEX_ID = re.compile(f"[0-9a-f]{{{FILE_ID_HEX_CHARS}}}")
_HEX_ID_PATTERN = f"^[0-9a-f]{{{FILE_ID_HEX_CHARS}}}$"
# ASCII byte -> its hex digit (only 0-9a-f occur: the ids are checked first).
_NIBBLE = np.zeros(256, dtype=np.uint64)
_NIBBLE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint64)
_SHIFTS = np.arange(4 * (FILE_ID_HEX_CHARS - 1), -4, -4, dtype=np.uint64)


class _PartitionStatuses:
    """The winning status of every file of one partition, for one model and config."""

    def __init__(self, file_ids: pa.Array, statuses: pa.Array) -> None:
        hex_mask = pc.match_substring_regex(file_ids, _HEX_ID_PATTERN).to_numpy(
            zero_copy_only=False
        )
        codes = _codes(statuses)
        hex_ids = _parse_hex(file_ids.filter(pa.array(hex_mask)))
        order = np.argsort(hex_ids, kind="stable")
        self._ids = hex_ids[order]
        self._codes = codes[hex_mask][order]
        # Ids not made by store.tables.file_id_for (tests, hand-made rows): few, in a dict.
        other = ~hex_mask
        self._other = dict(
            zip(
                file_ids.filter(pa.array(other)).to_pylist(),
                [_STATUSES[c] for c in codes[other]],
                strict=True,
            )
        )

    def get(self, file_id: str) -> str | None:
        if not _HEX_ID.fullmatch(file_id):
            return self._other.get(file_id)
        wanted = np.uint64(int(file_id, 16))
        at = int(np.searchsorted(self._ids, wanted))
        if at < len(self._ids) and self._ids[at] == wanted:
            return _STATUSES[self._codes[at]]
        return None

    def items(self) -> list[tuple[str, str]]:
        hex_items = [
            (f"{int(i):0{FILE_ID_HEX_CHARS}x}", _STATUSES[c])
            for i, c in zip(self._ids, self._codes, strict=True)
        ]
        return hex_items + list(self._other.items())


class LedgerLookup:
    """``file_id -> status`` for one model and config, read one date partition at a time.

    ``status`` reads the partition of ``date`` on first use (blocking I/O: an async caller
    calls ``load`` in a thread when ``is_loaded`` is False). Where uncompacted fragments hold
    several rows of a file, the winner rule of store/winners.py decides, as compaction does.
    """

    def __init__(self, location: OutputLocation, model: str, config_hash: str) -> None:
        self.model = model
        self.config_hash = config_hash
        self._fs, self._base = location.filesystem()
        self._partitions: dict[str, _PartitionStatuses] = {}

    def is_loaded(self, date: str) -> bool:
        """Whether ``date``'s partition is in memory already (``status`` will not block)."""
        return date in self._partitions

    def load(self, date: str) -> None:
        """Read the partition of ``date`` (once; a partition that does not exist is empty)."""
        if date in self._partitions:
            return
        directory = partition_dir(self._base, LEDGER_TABLE, self.model, date)
        self._partitions[date] = _read_partition(self._fs, directory, self.config_hash)

    def status(self, file_id: str, date: str) -> str | None:
        """The winning status of the file in the ledger, or None if it has no row."""
        self.load(date)
        return self._partitions[date].get(file_id)

    async def finished(self, file_id: str, date: str) -> bool:
        """Whether the file's status is one a rerun skips (``FINISHED``); the first file of a
        date reads its partition in a thread."""
        if not self.is_loaded(date):
            await asyncio.to_thread(self.load, date)
        return self.status(file_id, date) in FINISHED

    def statuses(self, date: str) -> list[tuple[str, str]]:
        """Every ``(file_id, status)`` of ``date``'s partition."""
        self.load(date)
        return self._partitions[date].items()


def read_ledger(location: OutputLocation, model: str, config_hash: str) -> dict[str, str]:
    """Return ``file_id -> status`` of every partition of one model and config.

    Reads the whole history of the model: a run's start-up uses ``LedgerLookup`` instead.

    Args:
        location: the dataset root.
        model: the ``model=`` partition to read.
        config_hash: the job config whose rows count.

    Returns:
        ``file_id -> status``; empty when the files table does not exist yet.
    """
    lookup = LedgerLookup(location, model, config_hash)
    fs, base = location.filesystem()
    selector = pafs.FileSelector(
        f"{table_dir(base, LEDGER_TABLE)}/model={model}", allow_not_found=True
    )
    done: dict[str, str] = {}
    for info in fs.get_file_info(selector):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("date="):
            date = info.base_name.removeprefix("date=")
            done.update(lookup.statuses(date))
    return done


def _read_partition(fs: pafs.FileSystem, directory: str, config_hash: str) -> _PartitionStatuses:
    return read_data_files(fs, [directory], lambda paths: _read_files(fs, paths, config_hash))


def _read_files(fs: pafs.FileSystem, paths: list[str], config_hash: str) -> _PartitionStatuses:
    empty = pa.array([], pa.string())
    if not paths:
        return _PartitionStatuses(empty, empty)
    # The explicit schema reads files from older schema versions with new columns as null.
    dataset = ds.dataset(paths, schema=file_schema(LEDGER_TABLE), format="parquet", filesystem=fs)
    table = dataset.to_table(
        columns=list(LEDGER_COLUMNS), filter=pc.field("config_hash") == config_hash
    )
    if table.num_rows == 0:
        return _PartitionStatuses(empty, empty)
    winners = files_winners(table, ("file_id",))
    return _PartitionStatuses(
        winners["file_id"].combine_chunks(), winners["status"].combine_chunks()
    )


def _codes(statuses: pa.Array) -> np.ndarray:
    indices = pc.index_in(statuses, value_set=pa.array(_STATUSES))
    return indices.to_numpy(zero_copy_only=False).astype(np.int8)


def _parse_hex(file_ids: pa.Array) -> np.ndarray:
    """16-hex-digit ids to uint64, vectorised: the string data is one contiguous buffer."""
    count = len(file_ids)
    if count == 0:
        return np.zeros(0, dtype=np.uint64)
    file_ids = pa.concat_arrays([file_ids]) if file_ids.offset else file_ids
    offsets = np.frombuffer(file_ids.buffers()[1], dtype=np.int32)
    data = np.frombuffer(file_ids.buffers()[2], dtype=np.uint8)
    start = int(offsets[0])
    digits = _NIBBLE[data[start : start + FILE_ID_HEX_CHARS * count]]
    return (digits.reshape(count, FILE_ID_HEX_CHARS) << _SHIFTS).sum(axis=1, dtype=np.uint64)
