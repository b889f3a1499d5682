"""Platform API jobs: submit S3 files as multi-file jobs, record each job, poll it, write rows.

A job is recorded (tasks/platform_jobs.py) the moment the first file's response returns, and
again after every further file, so a crash never loses a job the service is already
processing. Posting holds a "platform" slot of the run's SlotPool; waiting for a job holds none.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

import store as output
from modulate import (
    AuthError,
    BadInput,
    ConcurrencyLimited,
    JobStatus,
    ModulateError,
    MonthlyLimitReached,
    PlatformClient,
    PlatformFlags,
    RealtimeSession,
    RetryPolicy,
    Submission,
    decide,
)
from modulate.limits import GiveUp
from store.location import OutputLocation
from tasks.batch import RunStopped
from tasks.platform_jobs import JobFileRecord, JobRecord, save_record
from tasks.s3 import read_object
from tasks.slots import SlotPool

__all__ = [
    "MODEL",
    "PlatformRun",
    "PollSettings",
    "create_realtime_session",
    "poll_job",
    "submit_job",
]

MODEL = "platform"
DONE_STATUSES = frozenset({"completed", "failed"})
RUNNING_STATUSES = frozenset({"processing", "accepting_files", "queued"})
DEFAULT_POLICY = RetryPolicy()


class PollSettings(BaseModel):
    """How a run waits for its jobs: backoff from the initial to the max interval, then gives up."""

    model_config = ConfigDict(frozen=True)

    initial_interval_s: float = Field(
        default=2.0, gt=0, le=600, description="Seconds before the first status check."
    )
    max_interval_s: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait between two status checks."
    )
    backoff: float = Field(
        default=1.5, ge=1.0, le=4.0, description="Each wait is the previous one times this."
    )
    job_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="Give up waiting on a job after this long; a rerun re-attaches to it.",
    )


class PlatformRun:
    """Everything the jobs of one run share, in the flow's event loop.

    Not a dataclass on purpose: Prefect walks dataclass parameters of a task, and this holds
    live clients.
    """

    def __init__(
        self,
        *,
        client: PlatformClient,
        pool: SlotPool,
        flags: PlatformFlags,
        config_hash: str,
        s3_client: Any,
        location: OutputLocation,
        flow_run_id: str,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.flags = flags
        self.config_hash = config_hash
        self.s3_client = s3_client
        self.location = location
        self.flow_run_id = flow_run_id
        self.policy = policy or DEFAULT_POLICY
        self.rng = random.Random()
        self.statuses: Counter[str] = Counter()  # files by ledger status
        self.jobs: Counter[str] = Counter()  # jobs by how they ended in this run
        self.touched: set[tuple[str, str]] = set()  # (table, date) written this run

    def write(self, table: str, rows: list[dict[str, Any]], fragment_seed: str) -> None:
        """Write one fragment (deterministic name: a rerun overwrites) and count ledger rows."""
        if not rows:
            return
        fragment_id = hashlib.sha256(f"{self.config_hash}:{fragment_seed}".encode()).hexdigest()
        output.write_fragment(self.location, table, rows, fragment_id=fragment_id[:16])
        self.touched.update((table, row["date"]) for row in rows)
        if table == "files":
            self.statuses.update(row["status"] for row in rows)

    def ledger_row(
        self,
        f: JobFileRecord,
        status: str,
        *,
        error: BaseException | str | None = None,
        detail: str | None = None,
        started_at: datetime | None = None,
    ) -> dict[str, Any]:
        """One `files` row; `error` is an exception or a class name, `detail` log-safe text."""
        error_class = error if isinstance(error, str) or error is None else type(error).__name__
        if detail is None and isinstance(error, ModulateError):
            detail = str(error)
        return {
            "file_id": f.file_id,
            "config_hash": self.config_hash,
            "model": MODEL,
            "date": f.date,
            "source_uri": f.source_uri,
            "etag": f.etag,
            "size_bytes": f.size_bytes,
            "status": status,
            "error_class": error_class,
            "error_detail": detail,
            "attempts": f.attempts,
            "started_at": started_at or f.submitted_at,
            "finished_at": datetime.now(UTC),
            "flow_run_id": self.flow_run_id,
        }


@task(name="submit-platform-job", cache_policy=NO_CACHE)
async def submit_job(run: PlatformRun, record: JobRecord) -> JobRecord:
    """Post every file of the job not posted yet, with one job_id; finalize on the last.

    Args:
        run: The run's client, slot pool and output.
        record: A new job (no job_id yet) or an unfinalized one found by a rerun.

    Returns:
        The record as saved: `job_id` set once any file was accepted; `finalized` once the
        last file was. Files that could not be posted get their ledger row here.
    """
    logger = get_run_logger()
    pending = [f for f in record.files if not f.posted and f.error is None]
    failed: list[dict[str, Any]] = []
    for i, f in enumerate(pending):
        last = i == len(pending) - 1
        f.submitted_at = datetime.now(UTC)
        try:
            audio = await read_object(run.s3_client, *_bucket_key(f.source_uri))
            submission = await _post(run, f, audio, record.job_id, finalize=last)
        except MonthlyLimitReached as exc:
            for rest in pending[i:]:
                rest.error = "deferred"
                failed.append(run.ledger_row(rest, "deferred_quota", error=exc))
            break
        except AuthError as exc:
            raise RunStopped(str(exc)) from None
        except BadInput as exc:
            if record.job_id is not None and exc.status == 409:
                # A rerun resumed a job the service had finalized (the crash came between
                # the last post and its record): nothing is lost, poll it.
                logger.info("job %s was already finalized; polling it", record.job_id)
                record.finalized = f.posted = True
                break
            f.error = str(exc)
            failed.append(run.ledger_row(f, "failed", error=exc))
            continue
        except Exception as exc:  # noqa: BLE001 - S3 or give-up: this file fails, not the job
            f.error = type(exc).__name__
            detail = str(exc) if isinstance(exc, ModulateError) else f"could not send: {f.error}"
            failed.append(run.ledger_row(f, "failed", error=exc, detail=detail))
            continue
        record.job_id = submission.job_id
        f.posted, f.platform_file_id = True, submission.file_id
        record.finalized = last
        # Durable before anything else happens: a crash from here on re-attaches.
        await asyncio.to_thread(save_record, run.location, record)
        logger.info("job %s: file %s posted (finalize=%s)", record.job_id, f.file_id, last)
    if record.job_id is not None:
        await asyncio.to_thread(save_record, run.location, record)
    await asyncio.to_thread(run.write, "files", failed, f"submit:{_files_seed(record)}")
    if record.job_id is not None and not record.finalized:
        # The last file was refused after others were accepted: finalize the job without it,
        # so the accepted files still get their results.
        job_id = record.job_id
        try:
            await _with_policy(run, lambda: run.client.finalize_job(job_id))
        except AuthError as exc:
            raise RunStopped(str(exc)) from None
        except ModulateError as exc:
            logger.warning("job %s could not be finalized: %s", job_id, type(exc).__name__)
        else:
            record.finalized = True
            await asyncio.to_thread(save_record, run.location, record)
            return record
        detail = "job could not be finalized: its last file was refused"
        rows = [run.ledger_row(f, "failed", error="BadInput", detail=detail)
                for f in record.files if f.posted]
        record.closed, record.status = True, "unfinalized"
        await asyncio.to_thread(save_record, run.location, record)
        await asyncio.to_thread(run.write, "files", rows, f"unfinalized:{record.job_id}")
    return record


@task(name="poll-platform-job", cache_policy=NO_CACHE)
async def poll_job(run: PlatformRun, record: JobRecord, poll: PollSettings) -> str:
    """Wait for a finalized job with backoff, then write its rows and close its record.

    Returns:
        How the job ended here: "completed", "failed", "unknown" (the service does not know
        it: its files fail, its record closes) or "timeout" (its files fail for now; the record
        stays open so a rerun re-attaches).
    """
    logger = get_run_logger()
    job_id = record.job_id
    assert job_id is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + poll.job_timeout_s
    interval = poll.initial_interval_s
    strange: set[str] = set()
    status: JobStatus | None = None
    while True:
        try:
            status = await run.client.job_status(job_id)
        except AuthError as exc:
            raise RunStopped(str(exc)) from None
        except BadInput as exc:  # 404: the service does not know the job (expired, other org)
            detail = f"job unknown to the Platform API (HTTP {exc.status})"
            return await _close(run, record, "unknown", "BadInput", detail)
        except ModulateError as exc:  # transient or limited: the deadline bounds it
            logger.info("job %s: status check failed (%s); retrying", job_id, type(exc).__name__)
        else:
            if status.status in DONE_STATUSES:
                break
            if status.status not in RUNNING_STATUSES and status.status not in strange:
                strange.add(status.status)
                logger.warning("job %s: unexpected status %r; still waiting", job_id, status.status)
        if loop.time() + interval > deadline:
            detail = f"poll timeout after {poll.job_timeout_s:g} s"
            logger.warning("job %s: %s; a rerun re-attaches to it", job_id, detail)
            rows = [run.ledger_row(f, "failed", error="PollTimeout", detail=detail)
                    for f in record.files if f.posted]
            await asyncio.to_thread(run.write, "files", rows, f"timeout:{job_id}")
            run.jobs["timeout"] += 1
            return "timeout"
        await asyncio.sleep(interval)
        interval = min(poll.max_interval_s, interval * poll.backoff)

    results, ledger = _result_rows(run, record, status)
    await asyncio.to_thread(run.write, "platform_results", results, f"results:{job_id}")
    await asyncio.to_thread(run.write, "files", ledger, f"final:{job_id}")
    record.closed, record.status = True, status.status
    await asyncio.to_thread(save_record, run.location, record)
    run.jobs[status.status] += 1
    logger.info("job %s: %s (%d files)", job_id, status.status, len(ledger))
    return status.status


@task(name="create-platform-realtime-session", cache_policy=NO_CACHE)
async def create_realtime_session(
    client: PlatformClient, flags: PlatformFlags | None = None
) -> RealtimeSession:
    """Create a realtime_websocket job. Its URL carries a token: show it only via redact_url()."""
    session = await client.create_realtime_session(flags or PlatformFlags())
    get_run_logger().info("realtime job %s created", session.job_id)
    return session


async def _post(
    run: PlatformRun, f: JobFileRecord, audio: bytes, job_id: str | None, *, finalize: bool
) -> Submission:
    """One file's POST under a slot, retried per the policy; waits hold no slot."""

    def send() -> Awaitable[Submission]:
        f.attempts += 1
        return run.client.submit_file(
            audio, f.filename, flags=run.flags, job_id=job_id, finalize=finalize
        )

    return await _with_policy(run, send)


async def _with_policy(run: PlatformRun, send: Callable[[], Awaitable[Submission]]) -> Submission:
    """One POST under a slot, retried per the policy; waits hold no slot."""
    started = time.monotonic()
    transient = 0
    run.pool.add_demand(1)
    try:
        while True:
            async with run.pool.slot():
                try:
                    return await send()
                except (AuthError, BadInput, MonthlyLimitReached):
                    raise
                except ModulateError as exc:
                    error = exc
            if not isinstance(error, ConcurrencyLimited):
                transient += 1
            elapsed = time.monotonic() - started
            decision = decide(run.policy, error, transient, elapsed, run.rng)
            # decide() retries "too many at once" without end (a batch run has a breaker for
            # that); here the policy's total budget bounds it too.
            if isinstance(decision, GiveUp) or elapsed > run.policy.max_total_s:
                raise error
            await asyncio.sleep(decision.wait)
    finally:
        run.pool.add_demand(-1)


async def _close(
    run: PlatformRun, record: JobRecord, how: str, error_class: str, detail: str
) -> str:
    rows = [run.ledger_row(f, "failed", error=error_class, detail=detail)
            for f in record.files if f.posted]
    await asyncio.to_thread(run.write, "files", rows, f"{how}:{record.job_id}")
    record.closed, record.status = True, how
    await asyncio.to_thread(save_record, run.location, record)
    run.jobs[how] += 1
    return how


def _result_rows(
    run: PlatformRun, record: JobRecord, status: JobStatus
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """platform_results and files rows of a finished job, one each per posted file."""
    by_platform_id = {jf.file_id: jf for jf in status.files}
    by_name: dict[str, list[Any]] = {}
    for jf in status.files:
        by_name.setdefault(jf.filename or "", []).append(jf)
    results: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for f in (f for f in record.files if f.posted):
        jf = by_platform_id.get(f.platform_file_id or "") or next(
            iter(by_name.get(f.filename, [])), None
        )
        if jf is None:
            ledger.append(run.ledger_row(f, "failed", error="Transient",
                                         detail="file missing from the job's status"))
            continue
        if jf in by_name.get(jf.filename or "", []):
            by_name[jf.filename or ""].remove(jf)
        ok = jf.status == "completed" and jf.result is not None
        error = None if ok else (_error_text(jf.error) or f"file status {jf.status!r}")
        results.append(_result_row(run, record, f, jf.status, jf.result, error))
        ledger.append(run.ledger_row(f, "completed") if ok else
                      run.ledger_row(f, "failed", error="PlatformJobFailed", detail=error))
    return results, ledger


def _result_row(
    run: PlatformRun, record: JobRecord, f: JobFileRecord, status: str,
    result: dict[str, Any] | None, error: str | None,
) -> dict[str, Any]:
    result = result or {}
    transcript = result.get("transcript")
    synthetic = result.get("synthetic_voice")
    synthetic = synthetic if isinstance(synthetic, dict) else {}
    confidence = synthetic.get("confidence")
    return {
        "job_id": record.job_id,
        "file_id": f.file_id,
        "config_hash": run.config_hash,
        "platform_file_id": f.platform_file_id,
        "filename": f.filename,
        "status": status,
        "error": error,
        "raw_json": json.dumps(result, sort_keys=True) if result else None,
        "transcript_text": transcript.get("text") if isinstance(transcript, dict) else None,
        "emotion_json": _json_or_none(result.get("emotion")),
        "demographics_json": _json_or_none(result.get("demographics")),
        "synthetic_voice_verdict": synthetic.get("verdict"),
        "synthetic_voice_confidence": float(confidence) if confidence is not None else None,
        "model": MODEL,
        "date": f.date,
    }


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _error_text(error: str | dict[str, Any] | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return json.dumps(error, sort_keys=True)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _files_seed(record: JobRecord) -> str:
    return hashlib.sha256("".join(sorted(f.file_id for f in record.files)).encode()).hexdigest()
