"""Drive one batch run: list, skip what the ledger has, fan out chunks, compact, report.

Every batch flow is this function with a different job (tasks/jobs.py). The run ends
in one of three states a user reads at a glance in the Prefect UI:

* Completed: every file completed or skipped;
* Completed named "Completed with failures": some files failed (the `files` table says why);
* Completed named "Deferred": the monthly limit was reached; the unsent files are
  `deferred_quota` and a rerun after the limit resets sends exactly them and the failed ones;
* Completed named "Deferred by budget": the files that would not fit the period's audio hours
  (less the safety margin) are `deferred_budget`, sent by a rerun in the next period.

A bad key or a model not enabled fails the run at once with the setting to fix.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.context import get_run_context
from prefect.logging import get_run_logger
from prefect.states import Completed, State
from prefect_aws import S3Bucket
from pydantic import BaseModel, ConfigDict, Field

from blocks import ModulateCredentials, OrgLimits, ParquetOutput
from blocks.loading import load_blocks
from modulate import AuthError, ModelGate, ModelNotEnabled, RetryPolicy
from store.ledger import LedgerLookup
from tasks.batch import (
    DEFERRED,
    DEFERRED_BUDGET,
    DEFERRED_CONCURRENCY,
    FAILED,
    RunContext,
    RunStopped,
    finish_held,
    process_chunk,
)
from tasks.budget import BudgetReport, open_budget
from tasks.claims import DEFAULT_LEASE_S, Claims
from tasks.heap import frozen_heap
from tasks.jobs import BatchJob, config_hash
from tasks.ordering import DEFAULT_FILE_ORDER, LOOKAHEAD_OBJECTS, FileOrder, order_files
from tasks.results_writer import OutputUnwritable, ResultsWriter, WritePolicy, compact_written
from tasks.s3 import AudioObject, ObjectReader, S3Input, S3Listing
from tasks.slots import SlotPool, SlotsLost
from tasks.streaming import route_large_files

__all__ = ["RunSettings", "RunSummary", "run_batch"]

DEFAULT_POLICY = RetryPolicy()
PROGRESS_INTERVAL_SECONDS = 2.0


class RunSettings(BaseModel):
    """Which blocks a run uses, and how it fans out."""

    model_config = ConfigDict(frozen=True)

    credentials_block: str = Field(
        default="modulate", description="Name of the Modulate Credentials block (API key)."
    )
    limits_block: str = Field(
        default="modulate", description="Name of the Modulate Org Limits block."
    )
    output_block: str = Field(
        default="modulate", description="Name of the Modulate Parquet Output block."
    )
    # 100, not 50: each chunk costs a task run (its state updates) and a Parquet write per
    # table, ~1.7 ms of CPU per file at 50 (bench/). A crash re-sends at most the chunks in
    # flight (ceil(8C/chunk) + 2): 400 files instead of 300 at C = 25.
    chunk_size: int = Field(
        default=100, ge=1, le=1000, description="Files per Prefect task; calls inside run at once."
    )
    file_order: FileOrder = Field(
        default=DEFAULT_FILE_ORDER,
        description="The order files are sent in: largest first (the long calls start early "
        "and the slots drain together: the fastest run), or, to choose which files get the "
        "month's audio hours when they cannot cover the backlog, oldest or newest S3 object "
        "first, smallest first (the most files), or listing (S3 key order). Files are sent in "
        "this order until one does not fit the budget.",
    )
    order_window: int = Field(
        default=LOOKAHEAD_OBJECTS, ge=1, le=100_000,
        description="Files listed ahead and ordered by file_order (memory holds at most this "
        "many); windows follow the S3 key order.",
    )
    budget_as_of: datetime | None = Field(
        default=None,
        description="Reckon the billing period and the run-out forecast as of this time "
        "(UTC) instead of now; for what-if runs.",
    )
    claim_lease_seconds: float = Field(
        default=DEFAULT_LEASE_S, ge=1, le=3600,
        description="A run silent this long is dead: another run may send the files it claimed.",
    )


class RunSummary(BaseModel):
    """What a run did, as the table artifact shows it."""

    model: str
    config_hash: str
    files: dict[str, int] = Field(description="Files by status.")
    rejections: dict[str, int] = Field(description="Failed calls by error class.")
    calls: int
    audio_hours: float
    max_in_flight: int
    output_root: str
    note: str | None = None
    budget: BudgetReport | None = Field(default=None, description="The month's audio hours.")
    service_took_at_most: int | None = Field(
        default=None,
        description="The fewest of this run's calls on the wire during a call the service "
        "refused for concurrency, when below the limits block's figure: the most it took at "
        "once then (it may share the org's limit with other clients). None when the run's "
        "refusals were taken for the monthly limit.",
    )


async def run_batch(
    make_job: Callable[[Any, str], BatchJob],
    source: S3Input,
    settings: RunSettings,
    policy: RetryPolicy | None = None,
) -> State:
    """Run a batch job over the selected S3 objects and return the run's final state.

    Args:
        make_job: Builds the job from the input bucket's S3 client and bucket name.
        source: Which objects to take.
        settings: Block names and chunk size.
        policy: Retry waits and budgets; the default policy when None.
    """
    logger = get_run_logger()
    # Four independent server round trips: at once, they cost one of them at start-up.
    bucket, credentials, limits, parquet = await load_blocks(
        (S3Bucket, source.bucket_block),
        (ModulateCredentials, settings.credentials_block),
        (OrgLimits, settings.limits_block),
        (ParquetOutput, settings.output_block),
    )
    s3_client = bucket.credentials.get_s3_client()
    location = parquet.location()
    job = make_job(s3_client, bucket.bucket_name)
    model_limit = limits.for_model(job.model)
    job_hash = config_hash(job)
    # Reads a date's partition when the listing yields its first object, after the claims'
    # heartbeat is written: Claims.mark_done relies on that order.
    done = LedgerLookup(location, job.model, job_hash)
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    async def finished(obj: AudioObject) -> bool:
        return await done.finished(obj.file_id, obj.date)

    listing = S3Listing(s3_client, bucket.bucket_name, source, skip=finished)
    listing.prefetch()  # the first page comes while the rest is set up
    run_policy = policy or DEFAULT_POLICY
    async with (
        SlotPool(limits.limit_name(job.model), fallback_limit=model_limit.concurrent) as pool,
        credentials.batch_client() as client,
        ObjectReader(s3_client) as reader,
        Claims(
            location, job.model, job_hash, flow_run_id, lease_s=settings.claim_lease_seconds
        ) as claims,
    ):
        # C results or 2 s, whichever first: a crash loses at most that and the calls in flight.
        async with ResultsWriter(
            location, job_hash, max_files=model_limit.concurrent,
            policy=WritePolicy(time_scale=run_policy.time_scale), compact_model=job.model,
        ) as writer:
            ctx = RunContext(
                job=job,
                config_hash=job_hash,
                client=client,
                pool=pool,
                gate=ModelGate(
                    model=job.model, declared=model_limit.concurrent,
                    source=f"limits block {settings.limits_block!r}",
                ),
                policy=run_policy,
                s3_client=s3_client,
                reader=reader,
                location=location,
                flow_run_id=flow_run_id,
                writer=writer,
                claims=claims,
            )

            budget = ctx.budget = await open_budget(
                limits, job.model, location, now=settings.budget_as_of
            )
            todo = order_files(
                listing, settings.file_order, settings.order_window, ready=listing.ready
            )
            stopped: BaseException | None = None
            s3_error: BaseException | None = None
            unwritable: BaseException | None = None
            try:
                # Frozen once the run is set up: its clients and blocks are out of the collector's
                # passes as well (tasks/heap.py).
                async with route_large_files(ctx, credentials.streaming_client(), limits):
                    with frozen_heap():
                        await _fan_out(ctx, todo, settings.chunk_size, model_limit.concurrent)
                        await finish_held(ctx)
            except* (AuthError, RunStopped, SlotsLost) as group:
                stopped = group.exceptions[0]
            except* (BotoCoreError, ClientError) as group:
                # Per-file reads are caught per file; what gets here is the listing or an
                # output write (no bucket, credentials, S3 down): say where, not a group trace.
                s3_error = group.exceptions[0]
            except* (OutputUnwritable, OSError) as group:
                # The writer retried as writes, never as calls; pyarrow raises OSError.
                unwritable = group.exceptions[0]
        # Every row is written: what the writer's folds left is compacted while the claims
        # left (those marked done while another run was live) are removed and the slots given
        # back.
        compaction = asyncio.create_task(compact_written(location, job.model, writer.touched))
    try:
        await compaction
    except OSError as exc:  # what was written stays, uncompacted: readers dedupe (docs/data.md)
        unwritable = unwritable or exc
    summary = RunSummary(
        model=job.model,
        config_hash=job_hash,
        files=dict(ctx.statuses),
        rejections=dict(ctx.rejections),
        calls=ctx.calls,
        audio_hours=round(ctx.audio_ms / 3_600_000, 4),
        max_in_flight=pool.max_in_use,
        output_root=location.root,
        note=ctx.gate.likely_cause if ctx.gate.open else budget.closed,
        budget=budget.report(),
        # Once the breaker is open, the refusals spoke of the month, not of concurrency.
        service_took_at_most=None if ctx.gate.open else ctx.gate.took_at_most,
    )
    await acreate_table_artifact(
        table=[{"measure": k, "value": v} for k, v in _summary_lines(summary)],
        key=f"modulate-{job.model}-summary",
        description=f"Modulate {job.model} run: files by status, calls, rejections, output.",
    )
    logger.info(
        "%s run: %s; %d calls; rejections %s; output %s; %s",
        job.model, summary.files, summary.calls, summary.rejections, summary.output_root,
        "; ".join(f"{k} {v}" for k, v in budget.report().lines()),
    )
    if summary.service_took_at_most is not None:
        # The gate's first warning gave the count of its moment; this is the run's tightest.
        logger.warning(
            "%s says %d for %s; in this run the service refused a call while %d of ours "
            "were on the wire, so it took at most %d at once",
            ctx.gate.source, ctx.gate.declared, job.model,
            summary.service_took_at_most, summary.service_took_at_most,
        )
    if stopped is not None:
        raise RuntimeError(_fix_message(stopped, settings)) from None
    if unwritable is not None:
        raise RuntimeError(
            f"The output stopped the run: {unwritable}. Check the Modulate Parquet Output "
            f"block {settings.output_block!r} ({location.root}). Written before the stop: "
            f"{summary.files or 'no files'}; a rerun sends only the files not written."
        ) from None
    if s3_error is not None:
        raise RuntimeError(
            f"S3 failed for s3://{bucket.bucket_name}/{source.prefix} (S3 Bucket block "
            f"{source.bucket_block!r}): {s3_error}"
        ) from None
    return _final_state(summary)


async def _fan_out(
    ctx: RunContext, objects: AsyncIterator[AudioObject], chunk_size: int, concurrent: int
) -> None:
    """Run chunks as the listing yields them, enough at once to keep every slot busy."""
    # Enough chunks at once that ~8*C files stay queued for the slots while the oldest
    # chunk writes its Parquet and its successor is started and read (1-2 s measured
    # on 2 cores); with fewer, the slots went idle between waves (bench/, BENCHMARKS.md).
    in_flight = asyncio.Semaphore(math.ceil(8 * concurrent / chunk_size) + 2)
    progress_id = await acreate_progress_artifact(
        0.0, description=f"Files of this {ctx.job.model} run finished, of those listed so far."
    )
    listed = 0
    finished = 0
    loop = asyncio.get_running_loop()
    next_progress = loop.time() + PROGRESS_INTERVAL_SECONDS

    async def run_chunk(chunk: list[AudioObject]) -> None:
        nonlocal finished, next_progress
        try:
            outcomes = await process_chunk(ctx, chunk)
        finally:
            in_flight.release()
        finished += len(outcomes)
        # Each update is a server round trip on the event loop the calls share; a person
        # watching the UI needs no more than one every few seconds (the last one is sent
        # after the fan-out, whatever the time).
        if loop.time() >= next_progress:
            next_progress = loop.time() + PROGRESS_INTERVAL_SECONDS
            await aupdate_progress_artifact(progress_id, 100.0 * finished / max(listed, 1))

    # No tags on the chunk tasks: for tagged task runs Prefect asks the server for a
    # concurrency lease at every start (0.3 s in a deployed run), a write on the endpoint a
    # SQLite server under load answered 503 after 2 s (tasks/slots.py `_lease_client`).
    async with asyncio.TaskGroup() as group:
        chunk: list[AudioObject] = []
        async for obj in objects:
            listed += 1
            chunk.append(obj)
            if len(chunk) == chunk_size:
                await in_flight.acquire()
                first = group.create_task(run_chunk(chunk))
                chunk = []
                if listed == chunk_size:
                    await _first_call_or_end(ctx, first, chunk_size)
        if chunk:
            await in_flight.acquire()
            group.create_task(run_chunk(chunk))
        if ctx.writer is not None:
            ctx.writer.listing_ended()
    await aupdate_progress_artifact(progress_id, 100.0)


async def _first_call_or_end(ctx: RunContext, chunk: asyncio.Task[None], files: int) -> None:
    """Let the first chunk reach its first call before the next chunks start.

    Task runs started together queue on the Prefect server (four at once delayed the first
    call by 2.2 s, bench/); one chunk alone already fills every slot. Meanwhile the pool
    counts the chunk's first calls as demand, so that it leases slots (or tells the runs
    holding them that it waits) while Prefect starts the task and the chunk claims its
    files: 0.3-2.5 s from the chunk's creation to its first call in deployed runs.
    """
    early = min(files, ctx.pool.limit)
    ctx.pool.add_demand(early)
    called = asyncio.ensure_future(ctx.first_call.wait())
    try:
        await asyncio.wait([called, chunk], return_when=asyncio.FIRST_COMPLETED)
    finally:
        called.cancel()
        ctx.pool.add_demand(-early)  # the files count themselves from their reads on


def _summary_lines(summary: RunSummary) -> list[tuple[str, Any]]:
    lines: list[tuple[str, Any]] = [(f"files {k}", v) for k, v in sorted(summary.files.items())]
    lines += [(f"rejections {k}", v) for k, v in sorted(summary.rejections.items())]
    lines += [
        ("calls sent", summary.calls),
        ("audio hours", summary.audio_hours),
        ("max calls in flight", summary.max_in_flight),
        ("config hash", summary.config_hash),
        ("output", summary.output_root),
    ]
    if summary.service_took_at_most is not None:
        lines.append(("service took at most (calls at once)", summary.service_took_at_most))
    if summary.budget:
        lines += summary.budget.lines()
    if summary.note:
        lines.append(("note", summary.note))
    return lines


# The first status present names the run's state (all of COMPLETED type: nothing is lost).
_STATES: tuple[tuple[str, str, str], ...] = (
    (DEFERRED, "Deferred", "Monthly limit reached ({note}); {counts}. "
     "Rerun after the limit resets to send the deferred and failed files."),
    (DEFERRED_BUDGET, "Deferred by budget", "{note}; {counts}. A rerun in the next billing "
     "period sends the deferred and failed files."),
    (DEFERRED_CONCURRENCY, "Deferred", "The service kept refusing calls for concurrency; "
     "{counts}. Other clients of the organisation may be using its limit: rerun later to send "
     "the deferred files."),
    (FAILED, "Completed with failures", "{counts}; the files table says why each failed."),
)


def _final_state(summary: RunSummary) -> State:
    counts = ", ".join(f"{n} {status}" for status, n in sorted(summary.files.items())) or "no files"
    for status, name, message in _STATES:
        if summary.files.get(status):
            text = message.format(note=summary.note, counts=counts)
            return Completed(name=name, message=text, data=summary)
    return Completed(message=counts, data=summary)


def _fix_message(error: BaseException, settings: RunSettings) -> str:
    if isinstance(error, SlotsLost):
        return str(error)
    if isinstance(error, ModelNotEnabled):
        return (
            f"The model is not enabled for this organisation ({error}). Ask Modulate to enable "
            f"it, or use the API key of an organisation that has it (block "
            f"{settings.credentials_block!r})."
        )
    return (
        f"Modulate refused the calls ({error}). Set a valid api_key in the Modulate "
        f"Credentials block {settings.credentials_block!r}, and check that the model is enabled "
        "for its organisation."
    )
