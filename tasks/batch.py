"""Send a chunk of S3 files to a batch model within the org's limits; hand each file's rows on.

A chunk is one Prefect task with many files inside, called concurrently; every call
goes through `call_with_retries()` (modulate/limits.py) under a slot of the run's
`SlotPool` and the run's `ModelGate`, which weighs every refusal (DESIGN.md sections 2
and 3). Per-file outcomes go to the `files` ledger, never to the task graph: each file
hands its rows to the run's `ResultsWriter` (tasks/results_writer.py) the moment it ends.

While the gate is suspect, only one call at a time probes the service; once its
breaker is open, every file not yet sent is recorded `deferred_quota` without a call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
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
from store.location import OutputLocation
from tasks.claims import Acquired, Claims
from tasks.jobs import BatchJob, Rows
from tasks.results_writer import OutputUnwritable, ResultsWriter
from tasks.s3 import AudioObject, ObjectReader
from tasks.slots import SlotPool, SlotsLost
from tasks.usage import USAGE_TABLE, usage_row

if TYPE_CHECKING:
    from tasks.budget import BudgetGate
    from tasks.streaming import StreamRoute

__all__ = [
    "DEFERRED_BUDGET", "DEFERRED_CONCURRENCY", "FileOutcome", "RunContext", "RunStopped",
    "finish_held", "process_chunk",
]

COMPLETED, FAILED, DEFERRED, SKIPPED = "completed", "failed", "deferred_quota", "skipped"
DEFERRED_CONCURRENCY = "deferred_concurrency"
DEFERRED_BUDGET = "deferred_budget"  # would not fit the month's audio hours (tasks/budget.py)
# Not a ledger status: files another live run claimed, whose rows that run writes.
BY_OTHER_RUN = "done by another run"
# A file held by another live run is asked for again every lease / 6, for at most 10 leases.
CLAIM_POLLS_PER_LEASE = 6
CLAIM_WAIT_LEASES = 10


class RunStopped(Exception):
    """A failure no other file can get past (bad key, model not enabled): the run stops."""


@dataclass(frozen=True)
class FileOutcome:
    """What became of one file, for counters; its rows are already written."""

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
        reader: ObjectReader,
        location: OutputLocation,
        flow_run_id: str,
        writer: ResultsWriter | None = None,
        claims: Claims | None = None,
    ) -> None:
        self.job = job
        self.config_hash = config_hash
        self.client = client
        self.pool = pool
        self.gate = gate
        gate.listeners.append(pool.set_ceiling)  # the pool hands out no more than it accepts
        self.policy = policy
        self.s3_client = s3_client
        self.reader = reader
        self.location = location
        self.flow_run_id = flow_run_id
        self.writer = writer  # the run's; a streaming context routed to hands rows back to it
        self.claims = claims
        self.budget: BudgetGate | None = None  # the month's audio hours (tasks/budget.py)
        self.held: list[AudioObject] = []  # claimed by another live run when their chunk came
        self.rng = random.Random()
        self.statuses: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.calls = 0
        self.audio_ms = 0
        # Files over the batch size limit go to the job's streaming model (tasks/streaming.py).
        self.streaming: StreamRoute | None = None
        self.first_call = asyncio.Event()  # set by the run's first call to the service
        # Files between their S3 read and the end of their call: the pool's slots plus as
        # many read ahead. Unbounded, every file of the chunks in flight was read at once:
        # all their audio sat in memory (400 files here; 100 MB files would not fit), and
        # a new chunk queued all its reads ahead of the ones its first calls waited for
        # (3.5 s at start-up with 4 chunks of 100). A read ahead per slot keeps the slots
        # fed whenever a read is shorter than a call.
        self.reads = asyncio.Semaphore(2 * pool.fallback_limit)


@task(name="process-chunk", cache_policy=NO_CACHE)
async def process_chunk(ctx: RunContext, objects: list[AudioObject]) -> list[FileOutcome]:
    """Call the model for every file of the chunk; each file's rows are written as it ends.

    The chunk's files are claimed first (tasks/claims.py): a file another live run holds is
    left for `finish_held`, so this run goes on with files nobody holds. No task
    retries: a retry would send the chunk's calls again, paid for already. A failed write is
    retried as a write by the run's `ResultsWriter`.

    Args:
        ctx: The run's shared clients, limits, writer, claims and counters.
        objects: The chunk's files, none of them completed before for this config.

    Returns:
        One outcome per file this run processed, once every one of their rows is durable.
    """
    logger = get_run_logger()  # once per chunk, not per file: it walks the run context
    by_id = {obj.file_id: obj for obj in objects}
    claimed = await _acquire(ctx, list(by_id))
    outcomes: dict[str, FileOutcome] = {}
    durable: list[str] = []

    async def process(file_id: str) -> None:
        outcomes[file_id] = await _process_and_write(ctx, by_id[file_id], logger)
        durable.append(file_id)

    if claimed.done:
        ctx.statuses[BY_OTHER_RUN] += len(claimed.done)
    ctx.held.extend(by_id[file_id] for file_id in claimed.held)  # for `finish_held`
    try:
        async with asyncio.TaskGroup() as group:
            for file_id in claimed.mine:
                group.create_task(process(file_id))
    except* (AuthError, RunStopped, OutputUnwritable, SlotsLost) as stopped:
        # One bad key (or a lost Prefect API) fails every file alike: stop the chunk, mark
        # none of them failed.
        # An output that stays unwritable stops the run: nothing more can be recorded.
        raise stopped.exceptions[0] from None
    finally:
        if ctx.claims is not None and durable:
            await asyncio.to_thread(ctx.claims.mark_done, durable)
    return [outcomes[o.file_id] for o in objects if o.file_id in outcomes]


async def finish_held(ctx: RunContext) -> None:
    """After the listing: wait for the files other live runs held, within a bound.

    A file its holder marks done is left to it (its rows are written); one whose holder died
    is taken over and processed here. Past 10 leases the rest are left to their live holders.
    """
    if ctx.claims is None:
        return
    lease = ctx.claims.lease_s
    deadline = time.monotonic() + CLAIM_WAIT_LEASES * lease
    while ctx.held and time.monotonic() < deadline:
        await asyncio.sleep(lease / CLAIM_POLLS_PER_LEASE)
        held, ctx.held = ctx.held, []
        await process_chunk(ctx, held)  # what is still held comes back to ctx.held
    if ctx.held:
        get_run_logger().warning(
            "%d files are still held by another live run after %.0f s: left to it",
            len(ctx.held), CLAIM_WAIT_LEASES * lease,
        )
        ctx.statuses[BY_OTHER_RUN] += len(ctx.held)
        ctx.held = []


async def _acquire(ctx: RunContext, file_ids: list[str]) -> Acquired:
    if ctx.claims is None:
        return Acquired(mine=file_ids)
    return await asyncio.to_thread(ctx.claims.acquire, file_ids)  # one thread hop per chunk


async def _process_and_write(
    ctx: RunContext, obj: AudioObject, logger: logging.Logger | logging.LoggerAdapter[Any]
) -> FileOutcome:
    if ctx.writer is None:
        raise RuntimeError("a RunContext that runs chunks needs a ResultsWriter")
    try:
        ledger, rows = await _process_file(ctx, obj, logger)
        await ctx.writer.put(ledger, rows)  # returns once the rows are durable
    finally:
        ctx.writer.leave(obj.file_id)  # a file stopped on its way gives its room back
    outcome = FileOutcome(ledger["status"], ledger["error_class"], ledger["audio_duration_ms"])
    ctx.statuses[outcome.status] += 1
    ctx.audio_ms += outcome.audio_duration_ms or 0
    return outcome


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
        "flow_run_id": ctx.flow_run_id,  # the attempt: child rows follow their file's winner
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
    # A file wants a slot from its read on, so the pool leases while the reads run. Counted
    # from the call on, the demand grew only as reads ended and the pool leased in several
    # passes: 1.3 s from a run's first lease to all 25 slots, 0.3 s since (bench host). If
    # the output stalls, the files waiting for the writer's room keep their slots wanted
    # until the writer gives up (WritePolicy, 7.5 s).
    async with ctx.reads, ctx.pool.wanted():
        audio: bytes | None = None  # a streaming job reads S3 in ranges itself as it sends
        try:
            if getattr(ctx.job, "reads_whole_file", True):
                audio = await ctx.reader.read(obj.bucket, obj.key)
        except Exception as exc:  # noqa: BLE001 - any S3 failure fails this file, not the batch
            detail = f"could not read {obj.uri}: {type(exc).__name__}"
            return finish(FAILED, exc, detail=detail), {}
        if ctx.budget is not None and (over := await ctx.budget.reserve(obj, audio)):
            return finish(DEFERRED_BUDGET, detail=over), {}

        if ctx.writer is not None:
            await ctx.writer.room(obj.file_id)  # bounds what a crash loses
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
            del audio  # the rows need only the result
    ledger["audio_duration_ms"] = getattr(result, "duration_ms", None) or getattr(
        getattr(result, "metadata", None), "duration_ms", None
    )
    try:
        rows = await ctx.job.rows(result, obj, key)
    except Exception as exc:  # noqa: BLE001 - one file's output (its redacted MP3) fails it alone
        detail = f"the call succeeded but its output could not be written: {_s3_reason(exc)}"
        return finish(FAILED, exc, detail=detail), {}
    # The redacted MP3 of a PII file, as docs/data.md says of files.output_uri.
    ledger["output_uri"] = next(
        (row.get("redacted_audio_uri") for row in rows.get("redactions", [])), None
    ) or None
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


def _s3_reason(error: BaseException) -> str:
    """The class of an output error and, for S3, its error code (log-safe: no key, no body)."""
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        return f"{type(error).__name__} {code}".strip()
    return type(error).__name__


def _safe_detail(error: BaseException) -> str:
    """The log-safe text of an error: ModulateError messages carry no key or transcript."""
    if isinstance(error, ModulateError):
        return str(error)
    return type(error).__name__
