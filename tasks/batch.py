"""Send a chunk of S3 files to a batch model within the org's limits, and write its rows.

A chunk is one Prefect task with many files inside, called concurrently; every call
waits for a slot of the run's `SlotPool`, and every failure is classified before
`decide()` says whether to wait or give up (DESIGN.md sections 2 and 3). Per-file
outcomes go to the `files` ledger, never to the task graph.

While the quota breaker is suspect, only one call at a time probes the service; once
it is open, every file not yet sent is recorded `deferred_quota` without a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from modulate import (
    AuthError,
    BadInput,
    BatchClient,
    ConcurrencyLimited,
    ModulateError,
    MonthlyLimitReached,
    QuotaBreaker,
    RetryPolicy,
    decide,
)
from modulate._constants import MAX_BATCH_BYTES
from modulate.limits import GiveUp
from store import fragments
from store.location import OutputLocation
from tasks.jobs import BatchJob, Rows
from tasks.s3 import AudioObject, read_object
from tasks.slots import SlotPool

if TYPE_CHECKING:
    from tasks.streaming import StreamRoute

__all__ = ["FileOutcome", "RunContext", "RunStopped", "process_chunk"]

COMPLETED, FAILED, DEFERRED, SKIPPED = "completed", "failed", "deferred_quota", "skipped"


class RunStopped(Exception):
    """A failure no other file can get past (bad key, model not enabled): the run stops."""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file, for counters; its row is already in the chunk's fragment."""

    status: str
    error_class: str | None
    audio_duration_ms: int | None


class RunContext:
    """Everything the chunks of one run share, living in the flow's event loop.

    Not a dataclass on purpose: Prefect walks dataclass parameters of a task, and this
    holds live clients.
    """

    def __init__(
        self,
        *,
        job: BatchJob,
        config_hash: str,
        client: BatchClient,
        pool: SlotPool,
        breaker: QuotaBreaker,
        policy: RetryPolicy,
        s3_client: Any,
        location: OutputLocation,
        flow_run_id: str,
    ) -> None:
        self.job = job
        self.config_hash = config_hash
        self.client = client
        self.pool = pool
        self.breaker = breaker
        self.policy = policy
        self.s3_client = s3_client
        self.location = location
        self.flow_run_id = flow_run_id
        self.rng = random.Random()
        self.statuses: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.calls = 0
        self.audio_ms = 0
        self.touched: set[tuple[str, str]] = set()  # (table, date) written this run
        # Files over the batch size limit go to the job's streaming model (tasks/streaming.py).
        self.streaming: StreamRoute | None = None
        self.first_call = asyncio.Event()  # set by the run's first call to the service
        self._probe = asyncio.Condition()
        self._probing = False
        # Files between their S3 read and the end of their call: the pool's slots plus as
        # many read ahead. Unbounded, every file of the chunks in flight was read at once:
        # all their audio sat in memory (400 files here; 100 MB files would not fit), and
        # since read_object takes two hops through the default thread pool (GET, then the
        # body), a new chunk queued all its GETs ahead of its first body read: its first
        # call waited for all of them (3.5 s at start-up with 4 chunks of 100). A read ahead
        # per slot keeps the slots fed whenever a read is shorter than a call.
        self.reads = asyncio.Semaphore(2 * pool.fallback_limit)

    @contextlib.asynccontextmanager
    async def permit(self) -> AsyncIterator[bool]:
        """Wait until this file may call; yields False when the breaker opened meanwhile.

        Taken after the pool slot, right before the call, so that files already queued
        for a slot see a breaker that turned suspect while they waited. While it is
        suspect, one call at a time probes the service.
        """
        async with self._probe:
            await self._probe.wait_for(
                lambda: self.breaker.open or not self.breaker.suspect or not self._probing
            )
            probing = self.breaker.suspect and not self.breaker.open
            self._probing = self._probing or probing
        try:
            yield not self.breaker.open
        finally:
            async with self._probe:
                if probing:
                    self._probing = False
                self._probe.notify_all()


@task(
    name="process-chunk",
    cache_policy=NO_CACHE,
    retries=1,
    retry_condition_fn=lambda task, run, state: _infrastructure_failure(state.data),
)
async def process_chunk(ctx: RunContext, objects: list[AudioObject]) -> list[FileOutcome]:
    """Call the model for every file of the chunk and write the chunk's rows.

    Args:
        ctx: The run's shared clients, limits and counters.
        objects: The chunk's files, none of them completed before for this config.

    Returns:
        One outcome per file, in order.
    """
    logger = get_run_logger()  # once per chunk, not per file: it walks the run context
    try:
        async with asyncio.TaskGroup() as group:
            running = [group.create_task(_process_file(ctx, obj, logger)) for obj in objects]
    except* (AuthError, RunStopped) as stopped:
        # One bad key fails every file alike: stop the chunk, mark none of them failed.
        raise stopped.exceptions[0] from None
    results = [done.result() for done in running]
    tables: Rows = {}
    for _, data_rows in results:
        for table, rows in data_rows.items():
            tables.setdefault(table, []).extend(rows)
    # Data rows first, the ledger last: a crash in between re-sends the chunk, and
    # compaction keeps one row per key.
    fragment_id = hashlib.sha256(
        (ctx.config_hash + "".join(sorted(o.file_id for o in objects))).encode()
    ).hexdigest()[:16]
    ledger = [file_row for file_row, _ in results]
    writes = [(table, rows) for table, rows in [*sorted(tables.items()), ("files", ledger)] if rows]
    # One thread hop for the chunk's tables: each hop is a wake-up of the event loop,
    # which is busy with every other chunk's calls meanwhile.
    await asyncio.to_thread(_write_tables, ctx.location, writes, fragment_id)
    for table, rows in writes:
        ctx.touched.update((table, row["date"]) for row in rows)
    outcomes = [
        FileOutcome(row["status"], row["error_class"], row["audio_duration_ms"]) for row in ledger
    ]
    for outcome in outcomes:
        ctx.statuses[outcome.status] += 1
        ctx.audio_ms += outcome.audio_duration_ms or 0
    return outcomes


def _write_tables(
    location: OutputLocation, writes: list[tuple[str, list[dict[str, Any]]]], fragment_id: str
) -> None:
    """Write the chunk's fragments in order (the ledger last; see process_chunk)."""
    for table, rows in writes:
        fragments.write_fragment(location, table, rows, fragment_id=fragment_id)


def _infrastructure_failure(error: object) -> bool:
    """Retry a chunk only for what a second try can mend (S3 or Parquet writes), never a
    stop of the run; per-file retries live in `_call_with_policy`."""
    return not isinstance(error, RunStopped | ModulateError)


async def _process_file(
    ctx: RunContext, obj: AudioObject, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> tuple[dict[str, Any], Rows]:
    if ctx.streaming is not None and obj.size > MAX_BATCH_BYTES:
        return await _process_file(await ctx.streaming.context(), obj, logger)
    key = {
        "file_id": obj.file_id,
        "config_hash": ctx.config_hash,
        "model": ctx.job.model,
        "date": obj.date,
        "flow_run_id": ctx.flow_run_id,  # the attempt: child rows follow its ledger row
    }
    ledger = {
        **key,
        "source_uri": obj.uri,
        "etag": obj.etag,
        "size_bytes": obj.size,
        "attempts": 0,
        "audio_duration_ms": None,
        "started_at": datetime.now(UTC),
    }

    def finish(status: str, error: BaseException | None = None, detail: str | None = None):
        ledger["status"] = status
        ledger["error_class"] = type(error).__name__ if error else None
        ledger["error_detail"] = detail or (_safe_detail(error) if error else None)
        ledger["finished_at"] = datetime.now(UTC)
        logger.debug("file %s model %s: %s", obj.file_id, ctx.job.model, status)
        return ledger

    extension = obj.filename.rsplit(".", 1)[-1].lower() if "." in obj.filename else ""
    if extension not in ctx.job.extensions:
        return finish(SKIPPED, detail=f"extension {extension or '(none)'!r} is not "
                      f"accepted by {ctx.job.model}"), {}
    if ctx.breaker.open:
        return finish(DEFERRED, detail=ctx.breaker.likely_cause), {}
    async with ctx.reads:  # from the read to the end of the call: see RunContext.reads
        audio: bytes | None = None  # a streaming job reads S3 in ranges itself as it sends
        try:
            if getattr(ctx.job, "reads_whole_file", True):
                audio = await read_object(ctx.s3_client, obj.bucket, obj.key)
        except Exception as exc:  # noqa: BLE001 - any S3 failure fails this file, not the batch
            detail = f"could not read {obj.uri}: {type(exc).__name__}"
            return finish(FAILED, exc, detail=detail), {}

        ctx.pool.add_demand(1)
        try:
            result = await _call_with_policy(ctx, obj, audio, ledger)
        except _Deferred:
            return finish(DEFERRED, detail=ctx.breaker.likely_cause), {}
        except (AuthError, RunStopped):
            raise
        except ModulateError as exc:
            return finish(FAILED, exc), {}
        finally:
            ctx.pool.add_demand(-1)
            del audio  # the rows need only the result
    rows = await ctx.job.rows(result, obj, key)
    ledger["audio_duration_ms"] = getattr(result, "duration_ms", None) or getattr(
        getattr(result, "metadata", None), "duration_ms", None
    )
    return finish(COMPLETED), rows


class _Deferred(Exception):
    """The breaker opened: this file waits for the next month."""


async def _call_with_policy(
    ctx: RunContext, obj: AudioObject, audio: bytes | None, ledger: dict[str, Any]
) -> Any:
    started = time.monotonic()
    transient_attempts = 0
    while True:
        async with ctx.pool.slot(), ctx.permit() as permitted:
            if not permitted:
                raise _Deferred
            ctx.calls += 1
            ctx.first_call.set()
            ledger["attempts"] += 1
            try:
                result = await ctx.job.call(ctx.client, audio, obj)
            except ModulateError as exc:
                error = exc
                ctx.breaker.record_rejection(error)
            else:
                ctx.breaker.record_success()
                return result
        ctx.rejections[type(error).__name__] += 1
        if isinstance(error, AuthError):
            raise error
        if isinstance(error, MonthlyLimitReached) or ctx.breaker.open:
            raise _Deferred
        if isinstance(error, BadInput):
            raise error
        if not isinstance(error, ConcurrencyLimited):
            transient_attempts += 1
        decision = decide(
            ctx.policy, error, transient_attempts, time.monotonic() - started, ctx.rng,
            breaker=ctx.breaker,
        )
        if isinstance(decision, GiveUp):
            if ctx.breaker.open:
                raise _Deferred
            raise error
        await asyncio.sleep(decision.wait)


def _safe_detail(error: BaseException) -> str:
    """The log-safe text of an error: ModulateError messages carry no key or transcript."""
    if isinstance(error, ModulateError):
        return str(error)
    return type(error).__name__
