"""Platform API jobs flow: S3 audio in groups of N files per job, submitted, polled, written.

A rerun first re-attaches to the jobs an earlier run left open (recorded under the output
root) and never posts again a file of an open job; it then sends what the ledger has not
completed in new jobs, the files of failed jobs included, each at most `max_resubmissions`
more times.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

from prefect import flow
from prefect.artifacts import acreate_table_artifact
from prefect.context import get_run_context
from prefect.logging import get_run_logger
from prefect.states import Completed, State
from prefect_aws import S3Bucket
from pydantic import BaseModel, ConfigDict, Field

from blocks import OrgLimits, ParquetOutput, PlatformCredentials
from blocks.loading import load_blocks
from modulate import ModelGate, PlatformFlags
from modulate._constants import MAX_PLATFORM_BYTES, PLATFORM_EXTENSIONS
from store import LedgerLookup
from store.job_records import JobFileRecord, JobRecord, failed_submissions, load_open_records
from store.tables import config_hash_for
from tasks.batch import RunStopped
from tasks.platform import MODEL, PlatformRun, PollSettings, WireMismatch, poll_job, submit_job
from tasks.results_writer import compact_written
from tasks.s3 import AudioObject, S3Input, S3Listing
from tasks.slots import SlotPool

__all__ = ["PlatformJobOptions", "PlatformSettings", "PlatformSummary", "platform_jobs"]

DEFAULT_MAX_RESUBMISSIONS = 2


class PlatformJobOptions(BaseModel):
    """How files are grouped into jobs, which analyses run, and how long to wait."""

    model_config = ConfigDict(frozen=True)

    files_per_job: int = Field(
        default=10, ge=1, le=500, description="Files posted into one multi-file job."
    )
    flags: PlatformFlags = Field(
        default_factory=PlatformFlags,
        description="Analyses besides the transcript; each costs extra API calls.",
    )
    poll: PollSettings = Field(
        default_factory=PollSettings, description="Status checks: backoff and per-job timeout."
    )
    max_resubmissions: int = Field(
        default=DEFAULT_MAX_RESUBMISSIONS,
        ge=0,
        le=20,
        description="How many more jobs a file of a failed job is sent in, over later runs.",
    )


class PlatformSettings(BaseModel):
    """Which blocks the run uses."""

    model_config = ConfigDict(frozen=True)

    platform_credentials_block: str = Field(
        default="modulate", description="Name of the Modulate Platform Credentials block."
    )
    limits_block: str = Field(
        default="modulate", description="Name of the Modulate Org Limits block ('platform')."
    )
    output_block: str = Field(
        default="modulate", description="Name of the Modulate Parquet Output block."
    )


class PlatformSummary(BaseModel):
    """What a run did, as its table artifact shows it."""

    config_hash: str
    files: dict[str, int] = Field(description="Files by ledger status.")
    jobs: dict[str, int] = Field(description="Jobs by how they ended in this run.")
    jobs_submitted: int
    jobs_reattached: int
    files_resubmitted: int = Field(description="Files of failed jobs sent again in new jobs.")
    files_not_resubmitted: int = Field(
        description="Files of failed jobs past max_resubmissions: left failed."
    )
    output_root: str


@flow(name="modulate-platform-jobs", log_prints=False)
async def platform_jobs(
    source: S3Input = S3Input(),
    # Frozen pydantic models (safe defaults; Prefect renders them in the run form).
    options: PlatformJobOptions = PlatformJobOptions(),  # noqa: B008
    settings: PlatformSettings = PlatformSettings(),  # noqa: B008
) -> State:
    """Send S3 audio (mp3, wav, opus; at most 5 MB each) to the Modulate Platform API in
    multi-file jobs, wait for them, and write the platform_results and files tables.

    Jobs left open by an earlier run (a crash, a poll timeout) are polled again, never
    resubmitted; files of failed jobs are sent again in new jobs, a bounded number of times.
    Posting holds the organisation's `platform` concurrent limit; waiting does not.

    Args:
        source: Which S3 objects to take: bucket block, prefix, glob, modified-since, max files.
        options: Files per job, the analyses to run (flags), how to poll, resubmissions.
        settings: The Platform credentials, org-limits and output block names.
    """
    logger = get_run_logger()
    bucket, credentials, limits, parquet = await load_blocks(
        (S3Bucket, source.bucket_block),
        (PlatformCredentials, settings.platform_credentials_block),
        (OrgLimits, settings.limits_block),
        (ParquetOutput, settings.output_block),
    )
    s3_client = bucket.credentials.get_s3_client()
    location = parquet.location()
    config_hash = config_hash_for({"model": MODEL, "flags": options.flags.model_dump()})
    reopen = await asyncio.to_thread(load_open_records, location, config_hash)
    failed_before = await asyncio.to_thread(failed_submissions, location, config_hash)
    done = LedgerLookup(location, MODEL, config_hash)  # reads a date's partition when listed
    claimed = {f.file_id for r in reopen for f in r.files if f.posted or f.error is None}

    async def finished(obj: AudioObject) -> bool:  # before `max_files` counts, as batch runs
        return obj.file_id in claimed or await done.finished(obj.file_id, obj.date)
    concurrent = limits.for_model(MODEL).concurrent
    flow_run_id = str(get_run_context().flow_run.id)  # type: ignore[union-attr]

    async with (
        SlotPool(limits.limit_name(MODEL), fallback_limit=concurrent) as pool,
        credentials.platform_client() as client,
    ):
        gate = ModelGate(
            model=MODEL, declared=concurrent,
            source=f"limits block {settings.limits_block!r}",
        )
        run = PlatformRun(
            client=client, pool=pool, gate=gate, flags=options.flags, config_hash=config_hash,
            s3_client=s3_client, location=location, flow_run_id=flow_run_id,
            credentials_block=settings.platform_credentials_block,
        )
        submitted = 0
        resubmits = _Resubmits(failed_before, options.max_resubmissions)
        # Jobs still posting hold their audio in memory; bound them. Polling ones hold nothing.
        posting = asyncio.Semaphore(max(1, concurrent))
        try:
            async with asyncio.TaskGroup() as group:
                for record in reopen:
                    logger.info("re-attaching to job %s", record.job_id)
                    group.create_task(_drive(run, record, options.poll, posting))
                listed = S3Listing(s3_client, bucket.bucket_name, source, skip=finished)
                groups = _groups(run, listed, resubmits, options.files_per_job)
                async for files in groups:
                    submitted += 1
                    record = JobRecord(config_hash=config_hash, files=files)
                    group.create_task(_drive(run, record, options.poll, posting))
        except* WireMismatch as stopped:
            raise RuntimeError(str(stopped.exceptions[0])) from None
        except* RunStopped as stopped:
            raise RuntimeError(
                f"The Platform API refused the credentials ({stopped.exceptions[0]}). Set a "
                "valid account UUID and API key in the Modulate Platform Credentials block "
                f"{settings.platform_credentials_block!r}."
            ) from None

    await compact_written(location, MODEL, run.touched)
    summary = PlatformSummary(
        config_hash=config_hash, files=dict(run.statuses), jobs=dict(run.jobs),
        jobs_submitted=submitted, jobs_reattached=len(reopen),
        files_resubmitted=resubmits.sent, files_not_resubmitted=resubmits.exhausted,
        output_root=location.root,
    )
    if resubmits.exhausted:
        logger.warning(
            "%d files failed in more than %d jobs and were not sent again (max_resubmissions)",
            resubmits.exhausted, options.max_resubmissions,
        )
    await acreate_table_artifact(
        table=[{"measure": k, "value": v} for k, v in _summary_lines(summary)],
        key="modulate-platform-summary",
        description="Modulate Platform run: files by status, jobs by outcome, output.",
    )
    logger.info("platform run: files %s; jobs %s", summary.files, summary.jobs)
    return _final_state(summary)


async def _drive(
    run: PlatformRun, record: JobRecord, poll: PollSettings, posting: asyncio.Semaphore
) -> None:
    """One job from wherever it stands: post what is left, then wait for it (no slot held)."""
    if not record.finalized:
        async with posting:
            record = await submit_job(run, record)
    if record.job_id is not None and record.finalized and not record.closed:
        await poll_job(run, record, poll)


async def _groups(
    run: PlatformRun,
    objects: AsyncIterator[AudioObject],
    resubmits: _Resubmits,
    size: int,
) -> AsyncIterator[list[JobFileRecord]]:
    """Files to send, `size` at a time; files the service would refuse get their row here."""
    group: list[JobFileRecord] = []
    refused: list[dict[str, object]] = []
    async for obj in objects:
        submission = resubmits.next_submission(obj.file_id)
        if submission is None:
            continue
        f = JobFileRecord(
            file_id=obj.file_id, source_uri=obj.uri, etag=obj.etag, size_bytes=obj.size,
            date=obj.date, filename=obj.filename, submission=submission,
        )
        extension = obj.filename.rsplit(".", 1)[-1].lower() if "." in obj.filename else ""
        if extension not in PLATFORM_EXTENSIONS:
            detail = f"extension {extension or '(none)'!r} is not accepted by the Platform API"
            refused.append(run.ledger_row(f, "skipped", detail=detail))
        elif obj.size > MAX_PLATFORM_BYTES:
            detail = (f"the file is {obj.size} bytes, over the Platform API's 5 MB limit "
                      f"({MAX_PLATFORM_BYTES} bytes); split it or use the batch flows")
            refused.append(run.ledger_row(f, "failed", error="BadInput", detail=detail))
        elif obj.size == 0:
            refused.append(run.ledger_row(f, "failed", error="BadInput", detail="empty file"))
        else:
            group.append(f)
            if len(group) == size:
                yield group
                group = []
    if group:
        yield group
    seed = "refused:" + ",".join(sorted(str(row["file_id"]) for row in refused))
    await asyncio.to_thread(run.write, "files", refused, seed)


class _Resubmits:
    """Which files of failed jobs go into a new job: at most `limit` more times each."""

    def __init__(self, failed_jobs: Counter[str], limit: int) -> None:
        self.failed_jobs, self.limit = failed_jobs, limit
        self.sent = self.exhausted = 0

    def next_submission(self, file_id: str) -> int | None:
        """The file's submission number in a new job, or None when it is past the bound."""
        failed = self.failed_jobs[file_id]
        if failed > self.limit:
            self.exhausted += 1
            return None
        self.sent += failed > 0
        return failed + 1


def _summary_lines(summary: PlatformSummary) -> list[tuple[str, object]]:
    lines: list[tuple[str, object]] = [(f"files {k}", v) for k, v in sorted(summary.files.items())]
    lines += [(f"jobs {k}", v) for k, v in sorted(summary.jobs.items())]
    lines += [
        ("jobs submitted", summary.jobs_submitted),
        ("jobs re-attached", summary.jobs_reattached),
        ("files resubmitted", summary.files_resubmitted),
        ("files not resubmitted", summary.files_not_resubmitted),
        ("config hash", summary.config_hash),
        ("output", summary.output_root),
    ]
    return lines


def _final_state(summary: PlatformSummary) -> State:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(summary.files.items())) or "no files"
    waiting = summary.jobs.get("timeout", 0)
    if waiting:
        counts += f"; {waiting} jobs still processing: rerun to re-attach to them"
    if summary.files.get("failed") or summary.files.get("deferred_quota"):
        return Completed(
            name="Completed with failures",
            message=f"{counts}; the files table says why each failed.",
            data=summary,
        )
    return Completed(message=counts, data=summary)
