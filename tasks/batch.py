"""Send a chunk of S3 files to a batch model within the org's limits, and write its rows.

A chunk is one Prefect task with many files inside, called concurrently; every call
goes through `call_with_retries()` (modulate/limits.py) under a slot of the run's
`SlotPool` and the run's `ModelGate`, which weighs every refusal (DESIGN.md sections 2
and 3). Per-file outcomes go to the `files` ledger, never to the task graph.

While the gate is suspect, only one call at a time probes the service; once its
breaker is open, every file not yet sent is recorded `deferred_quota` without a call.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from modulate import (
    AuthError,
    BatchClient,
    Deferred,
    ModelGate,
    ModulateError,
    RetryPolicy,
    call_with_retries,
)
from modulate._constants import MAX_BATCH_BYTES
from store import fragments
from store.location import OutputLocation
from tasks.jobs import BatchJob, Rows
from tasks.s3 import AudioObject, read_object
from tasks.slots import SlotPool, SlotsLost
from tasks.usage import USAGE_TABLE, usage_row

if TYPE_CHECKING:
    from tasks.budget import BudgetGate
    from tasks.streaming import StreamRoute

__all__ = [
    "DEFERRED_CONCURRENCY", "FileOutcome", "RunContext", "RunStopped", "process_chunk",
]

COMPLETED, FAILED, DEFERRED, SKIPPED = "completed", "failed", "deferred_quota", "skipped"
DEFERRED_CONCURRENCY = "deferred_concurrency"
DEFERRED_BUDGET = "deferred_budget"  # would not fit the month's audio hours (tasks/budget.py)


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
        gate: ModelGate,
        policy: RetryPolicy,
        s3_client: Any,
        location: OutputLocation,
        flow_run_id: str,
    ) -> None:
        self.job = job
        self.config_hash = config_hash
        self.client = client
        self.pool = pool
        self.gate = gate
        gate.listeners.append(pool.set_ceiling)  # the pool hands out no more than it accepts
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
        self.budget: BudgetGate | None = None  # the runner opens it (tasks/budget.py)
        self.first_call = asyncio.Event()  # set by the run's first call to the service
        # Files between their S3 read and the end of their call: the pool's slots plus as
        # many read ahead. Unbounded, every file of the chunks in flight was read at once:
        # all their audio sat in memory (400 files here; 100 MB files would not fit), and
        # since read_object takes two hops through the default thread pool (GET, then the
        # body), a new chunk queued all its GETs ahead of its first body read: its first
        # call waited for all of them (3.5 s at start-up with 4 chunks of 100). A read ahead
        # per slot keeps the slots fed whenever a read is shorter than a call.
        self.reads = asyncio.Semaphore(2 * pool.fallback_limit)


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
    except* (AuthError, RunStopped, SlotsLost) as stopped:
        # One bad key (or a lost Prefect API) fails every file alike: stop the chunk, mark
        # none of them failed.
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
    return not isinstance(error, RunStopped | ModulateError | SlotsLost)


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
        if ctx.budget is not None:
            ctx.budget.settle(obj, status, ledger["audio_duration_ms"])
        logger.debug("file %s model %s: %s", obj.file_id, ctx.job.model, status)
        return ledger

    extension = obj.filename.rsplit(".", 1)[-1].lower() if "." in obj.filename else ""
    if extension not in ctx.job.extensions:
        return finish(SKIPPED, detail=f"extension {extension or '(none)'!r} is not "
                      f"accepted by {ctx.job.model}"), {}
    if ctx.gate.open:
        return finish(DEFERRED, detail=ctx.gate.likely_cause), {}
    if ctx.budget is not None and (over := ctx.budget.refusal(obj)):
        return finish(DEFERRED_BUDGET, detail=over), {}
    async with ctx.reads:  # from the read to the end of the call: see RunContext.reads
        audio: bytes | None = None  # a streaming job reads S3 in ranges itself as it sends
        try:
            if getattr(ctx.job, "reads_whole_file", True):
                audio = await read_object(ctx.s3_client, obj.bucket, obj.key)
        except Exception as exc:  # noqa: BLE001 - any S3 failure fails this file, not the batch
            detail = f"could not read {obj.uri}: {type(exc).__name__}"
            return finish(FAILED, exc, detail=detail), {}
        if ctx.budget is not None and (over := await ctx.budget.reserve(obj, audio)):
            return finish(DEFERRED_BUDGET, detail=over), {}

        ctx.pool.add_demand(1)
        try:
            result = await _call_with_policy(ctx, obj, audio, ledger)
        except Deferred as deferred:
            status = DEFERRED if deferred.kind == "quota" else DEFERRED_CONCURRENCY
            return finish(status, detail=deferred.reason), {}
        except (AuthError, RunStopped, SlotsLost):
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
    billed = getattr(ctx.job, "stream_model", ctx.job.model)  # a routed file uses the stream's
    rows[USAGE_TABLE] = [usage_row(finish(COMPLETED), billed)]
    return ledger, rows


async def _call_with_policy(
    ctx: RunContext, obj: AudioObject, audio: bytes | None, ledger: dict[str, Any]
) -> Any:
    def attempt() -> None:
        ctx.calls += 1
        ctx.first_call.set()
        ledger["attempts"] += 1

    def refused(error: ModulateError) -> None:
        ctx.rejections[type(error).__name__] += 1

    return await call_with_retries(
        lambda: ctx.job.call(ctx.client, audio, obj),
        gate=ctx.gate, policy=ctx.policy, slot=ctx.pool.slot, rng=ctx.rng,
        on_attempt=attempt, on_refusal=refused,
    )


def _safe_detail(error: BaseException) -> str:
    """The log-safe text of an error: ModulateError messages carry no key or transcript."""
    if isinstance(error, ModulateError):
        return str(error)
    return type(error).__name__
