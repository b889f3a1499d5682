"""Send a chunk of S3 files to a batch model within the org's limits; hand each file's rows on.

A chunk is one Prefect task with many files inside, called concurrently; every call
waits for a slot of the run's `SlotPool`, and every failure is classified before
`decide()` says whether to wait or give up (DESIGN.md sections 2 and 3). Per-file
outcomes go to the `files` ledger, never to the task graph: each file hands its rows to
the run's `ResultsWriter` (tasks/results_writer.py) the moment it ends.

While the quota breaker is suspect, only one call at a time probes the service; once
it is open, every file not yet sent is recorded `deferred_quota` without a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError
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
from tasks.claims import Acquired, Claims
from tasks.jobs import BatchJob, Rows
from tasks.output import OutputLocation
from tasks.results_writer import OutputUnwritable, ResultsWriter
from tasks.s3 import AudioObject, read_object
from tasks.slots import SlotPool

if TYPE_CHECKING:
    from tasks.streaming import StreamRoute

__all__ = ["FileOutcome", "RunContext", "RunStopped", "finish_held", "process_chunk"]

COMPLETED, FAILED, DEFERRED, SKIPPED = "completed", "failed", "deferred_quota", "skipped"
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
        breaker: QuotaBreaker,
        policy: RetryPolicy,
        s3_client: Any,
        location: OutputLocation,
        flow_run_id: str,
        writer: ResultsWriter | None = None,
        claims: Claims | None = None,
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
        self.writer = writer  # the run's; a streaming context routed to hands rows back to it
        self.claims = claims
        self.held: list[AudioObject] = []  # claimed by another live run when their chunk came
        self.rng = random.Random()
        self.statuses: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self.calls = 0
        self.audio_ms = 0
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
    except* (AuthError, RunStopped, OutputUnwritable) as stopped:
        # One bad key fails every file alike: stop the chunk, mark none of them failed.
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
    ledger, rows = await _process_file(ctx, obj, logger)
    await ctx.writer.put(ledger, rows)  # returns once the rows are durable
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
    }
    ledger = {
        **key,
        "source_uri": obj.uri,
        "etag": obj.etag,
        "size_bytes": obj.size,
        "attempts": 0,
        "audio_duration_ms": None,
        "started_at": datetime.now(UTC),
        "flow_run_id": ctx.flow_run_id,
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

        if ctx.writer is not None:
            await ctx.writer.room()  # bounds what a crash loses (tasks/results_writer.py)
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
