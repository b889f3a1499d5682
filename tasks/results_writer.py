"""Make each file's result durable within seconds of its call, not at the end of its chunk.

A run has one `ResultsWriter`. Every file hands it its ledger row and data rows the moment it
ends (`put`), and `put` returns once those rows are on the output. The writer flushes what it
holds when it has `max_files` files or its oldest file has waited `max_delay_s` (whichever comes
first; the run passes the model's concurrent limit C and 2 s) or, once the run has listed its
last file, as soon as every file holding room (below) has handed its rows over: the last
rows of a run wait for no timer (up to 2 s of every run's end before). One flush at a time,
in a thread: data tables first, the `files` ledger last, so a ledger row never points at rows
that are not there. A flush's fragment name is a hash of the config and its file ids, so
writing it again overwrites it.

A file takes `room()` before its call and keeps it until its rows are durable, and at most
three times `max_files` files hold room at once: the C calls in flight, the files waiting
for a slot and the results waiting to be written, whatever the speed of the output. So a
SIGKILL loses no more than 3C paid results. (Counting only the results handed over let the
files read ahead pass while the count was low: 4C - 1 of them, C = 2 in
tests/test_results_writer.py.)

A failed write is retried as a write (bounded backoff), never by calling the service again. A
write that still fails breaks the writer: every waiting and later `put` raises
`OutputUnwritable`, which names the table and where it lives, and the run stops.

Given the model (`compact_model`), the writer also compacts what it wrote while the run goes
on, so that the run's end folds only the last few fragments: each partition once it holds
`fold_every` new fragments, and once more as soon as the listing has ended, each partition
holding `MIN_FOLD_FRAGMENTS` or more (the last chunks' calls, 6-8 s at C = 25 and 4 chunks of
100, outlast that fold). One fold at a time, in a thread, beside the flushes: a compaction
deletes only the fragments it listed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from store import compact
from store.fragments import write_fragment
from store.location import OutputLocation

__all__ = [
    "DEFAULT_MAX_DELAY_S", "OutputUnwritable", "ResultsWriter", "WritePolicy", "compact_written",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_DELAY_S = 2.0
# The run's end compacted every fragment the run wrote (80 per table at 2,000 files: 1.3 s,
# and the claims sweep beside it waited for the GIL; the run ended 1.6 s after its last call
# on the bench host, 0.4 s with these folds). The fold at a listing's end, about 25-100
# fragments per table in runs of 1,000-3,000 files, took 1.6-4.2 s in its thread.
FOLD_EVERY_FLUSHES = 200
# Fewer fragments than this cost the run's end less than a fold's own fixed cost (the lock,
# a listing, a scan of the segments' keys) costs the calls beside it.
MIN_FOLD_FRAGMENTS = 10
Rows = dict[str, list[dict[str, Any]]]


class OutputUnwritable(Exception):
    """The output stayed unwritable after every retry; rows of paid calls could not be saved."""

    def __init__(self, table: str, where: str, error: BaseException) -> None:
        # The error's class and text: pyarrow's and botocore's name the path and the S3 code,
        # never a key (they are not in their messages).
        super().__init__(f"could not write the {table} table to {where}: "
                         f"{type(error).__name__}: {error}")
        self.table = table
        self.where = where
        self.error = error

    def __reduce__(self) -> tuple[Any, ...]:
        # Prefect may pickle a task's exception; the default would call __init__(message).
        return (type(self), (self.table, self.where, self.error))


@dataclass(frozen=True)
class WritePolicy:
    """How a failed flush is retried: `attempts` in all, waits `initial_s * 2^(n-1)` up to
    `cap_s` (0.5 + 1 + 2 + 4 = 7.5 s in all by default), each multiplied by `time_scale`."""

    attempts: int = 5
    initial_s: float = 0.5
    cap_s: float = 8.0
    time_scale: float = 1.0

    def wait(self, attempt: int) -> float:
        return min(self.cap_s, self.initial_s * 2 ** (attempt - 1)) * self.time_scale


class ResultsWriter:
    """Buffers finished files' rows and flushes them within a bound; see the module docstring.

    Args:
        location: The output root.
        config_hash: The run's job config, part of every fragment name.
        max_files: Flush once this many files wait (the run gives the concurrent limit).
        max_delay_s: Flush once the oldest waiting file has waited this long.
        policy: Retries of a failed flush.
        compact_model: The model partition the rows go to: compact them while the run goes
            on (see the module docstring); None leaves all compaction to the caller.
        fold_every: Compact a partition once it holds this many fragments not yet folded.
    """

    def __init__(
        self,
        location: OutputLocation,
        config_hash: str,
        *,
        max_files: int,
        max_delay_s: float = DEFAULT_MAX_DELAY_S,
        policy: WritePolicy | None = None,
        compact_model: str | None = None,
        fold_every: int = FOLD_EVERY_FLUSHES,
    ) -> None:
        if max_files < 1:
            raise ValueError("max_files must be at least 1")
        self.location = location
        self.config_hash = config_hash
        self.max_files = max_files
        self.max_delay_s = max_delay_s
        self.policy = policy or WritePolicy()
        self.touched: set[tuple[str, str]] = set()  # (table, date) written, for compaction
        self.flushes = 0
        self.failure: OutputUnwritable | None = None
        self.window = 3 * max_files
        # Files between their room() and their rows written; files that made no call
        # (skipped, deferred before it) never take room: a crash costs nothing for them.
        self._holding: set[str] = set()
        self._handed: set[str] = set()  # of those, the files whose rows are pending
        self._freed = asyncio.Event()
        self._listing_ended = False
        self._pending: list[tuple[dict[str, Any], Rows, asyncio.Future[None]]] = []
        self._oldest = 0.0
        self._wake = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self.compact_model = compact_model
        self.fold_every = fold_every
        self.folds = 0
        self._unfolded: Counter[tuple[str, str]] = Counter()  # fragments since the last fold
        self._folded_at_end = False
        self._fold: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ResultsWriter:
        self._flusher = asyncio.create_task(self._flush_loop(), name="results-writer")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Flush what is left (also when the run stops: those calls were paid for), and let
        a fold under way end."""
        self._closing = True
        self._wake.set()
        if self._flusher is not None:
            await self._flusher
        if self._fold is not None:
            await self._fold

    async def room(self, file_id: str) -> None:
        """Wait until fewer than `window` files hold room, then hold it (call before a call).

        The file holds it until its rows are durable, or until `leave` if it ends otherwise.

        Raises:
            OutputUnwritable: the output could not be written.
        """
        while len(self._holding) >= self.window and self.failure is None:
            self._freed.clear()
            await self._freed.wait()
        if self.failure is not None:
            raise self.failure
        self._holding.add(file_id)

    def leave(self, file_id: str) -> None:
        """Give up a file's room if it still holds it (it stopped before its rows were put)."""
        if file_id in self._holding:
            self._holding.discard(file_id)
            self._handed.discard(file_id)
            self._freed.set()
            self._wake.set()  # it may have been the last file the flush waited for

    def listing_ended(self) -> None:
        """The run has listed its last file: once every file holding room has handed its
        rows over, nothing more is coming, so flush then instead of after `max_delay_s`."""
        self._listing_ended = True
        self._wake.set()
        self._fold_if_due()

    async def put(self, ledger_row: dict[str, Any], rows: Rows) -> None:
        """Hand over one finished file; returns once its rows are written.

        Raises:
            OutputUnwritable: the output could not be written (this flush or an earlier one).
        """
        if self.failure is not None:
            raise self.failure
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append((ledger_row, rows, done))
        if ledger_row["file_id"] in self._holding:
            self._handed.add(ledger_row["file_id"])
        self._wake.set()
        # Shielded: a cancelled waiter leaves its rows to be written all the same.
        await asyncio.shield(done)

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                if len(self._pending) < self.max_files and not self._closing and not (
                    self._listing_ended and self._handed == self._holding
                ):
                    delay = self._oldest + self.max_delay_s - time.monotonic()
                    if delay > 0:
                        # Not wait_for, which can swallow a cancel (see tasks/slots.py).
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(delay):
                                await self._wake.wait()
                        self._wake.clear()
                        continue
                # All that waits, also past max_files: after a slow write, fewer larger
                # fragments catch up faster than many small ones.
                batch, self._pending = self._pending, []
                await self._flush(batch)
            if self._closing:
                return

    async def _flush(self, batch: list[tuple[dict[str, Any], Rows, asyncio.Future[None]]]) -> None:
        ledger = [row for row, _, _ in batch]
        tables: Rows = {}
        for _, rows, _ in batch:
            for table, table_rows in rows.items():
                tables.setdefault(table, []).extend(table_rows)
        writes = [(t, r) for t, r in [*sorted(tables.items()), ("files", ledger)] if r]
        fragment_id = hashlib.sha256(
            (self.config_hash + "".join(sorted(row["file_id"] for row in ledger))).encode()
        ).hexdigest()[:16]
        if self.failure is None:
            try:
                # One thread hop per flush: the event loop is busy with the calls meanwhile.
                await asyncio.to_thread(self._write, writes, fragment_id)
            except OutputUnwritable as exc:
                self.failure = exc
        self._holding.difference_update(row["file_id"] for row in ledger)
        self._handed.difference_update(row["file_id"] for row in ledger)
        self._freed.set()  # also when the write failed: the waiters raise its error
        for _, _, done in batch:
            if done.done():
                continue
            if self.failure is not None:
                done.set_exception(self.failure)
                done.exception()  # retrieved here: a waiter cancelled meanwhile never reads it
            else:
                done.set_result(None)
        if self.failure is not None:
            return
        self.flushes += 1
        for table, rows in writes:
            dates = {row["date"] for row in rows}
            self.touched.update((table, date) for date in dates)
            self._unfolded.update((table, date) for date in dates)
        self._fold_if_due()

    def _fold_if_due(self) -> None:
        """Start a fold of the partitions due one, unless one is under way."""
        if self.compact_model is None or self._closing:
            return
        if self._fold is not None and not self._fold.done():
            return
        at_end = self._listing_ended and not self._folded_at_end
        self._folded_at_end = self._listing_ended
        due = {
            part for part, n in self._unfolded.items()
            if n >= self.fold_every or (at_end and n >= MIN_FOLD_FRAGMENTS)
        }
        if not due:
            return
        for part in due:
            del self._unfolded[part]
        self._fold = asyncio.create_task(
            self._fold_now(self.compact_model, due), name="results-fold"
        )

    async def _fold_now(self, model: str, parts: set[tuple[str, str]]) -> None:
        try:
            await compact_written(self.location, model, parts)
        except OSError as exc:  # the fragments stay readable; the run's end compacts again
            logger.warning(
                "could not compact %d partitions of %s during the run (%s: %s)",
                len(parts), self.location.root, type(exc).__name__, exc,
            )
        else:
            self.folds += 1

    def _write(self, writes: list[tuple[str, list[dict[str, Any]]]], fragment_id: str) -> None:
        """Write the flush's fragments in order, retrying each failed one as a write."""
        for table, rows in writes:
            for attempt in range(1, self.policy.attempts + 1):
                try:
                    write_fragment(self.location, table, rows, fragment_id=fragment_id)
                    break
                except OSError as exc:  # what pyarrow raises for local and S3 I/O alike
                    if attempt == self.policy.attempts:
                        raise OutputUnwritable(table, self.location.uri(table), exc) from exc
                    wait = self.policy.wait(attempt)
                    logger.warning(
                        "writing %s to %s failed (%s), attempt %d of %d; again in %.1f s",
                        table, self.location.uri(table), type(exc).__name__, attempt,
                        self.policy.attempts, wait,
                    )
                    time.sleep(wait)  # in the writer's thread, not the event loop


async def compact_written(
    location: OutputLocation, model: str, touched: Iterable[tuple[str, str]]
) -> None:
    """Compact the `(table, date)` partitions a run wrote, one at a time, in a thread.

    One at a time: two at once ended one run 0.37 s sooner and took that from the runs
    still calling on the same cores (three runs at once: 0.990 -> 0.920-0.948 of C/L,
    BENCHMARKS.md session 7).

    Raises:
        OSError: a compaction failed; what was written stays readable (readers dedupe).
    """
    for table, date in sorted(touched):
        await asyncio.to_thread(compact, location, table, model, [date])
