"""Platform API jobs: submit S3 files as multi-file jobs, record each job, poll it, write rows.

A job is recorded (store/job_records.py) the moment the first file's response returns, and
again after every further file, so a crash never loses a job the service is already
processing. Posting holds a "platform" slot of the run's SlotPool; waiting for a job holds none.
The same refusal on several uploads in a row stops the run as a wire-settings problem; a job
status that cannot be read ends that job's polling after a few answers, naming the setting.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from modulate import (
    AuthError,
    BadInput,
    Deferred,
    JobFile,
    JobStatus,
    ModelGate,
    ModulateError,
    PlatformClient,
    PlatformFlags,
    RealtimeSession,
    RetryPolicy,
    Submission,
    call_with_retries,
)
from store.fragments import write_fragment
from store.job_records import JobFileRecord, JobRecord, save_record, save_status
from store.location import OutputLocation
from tasks.batch import DEFERRED, DEFERRED_CONCURRENCY, RunStopped
from tasks.s3 import read_object
from tasks.slots import SlotPool

__all__ = [
    "MODEL",
    "PlatformRun",
    "PollSettings",
    "WireMismatch",
    "create_realtime_session",
    "poll_job",
    "submit_job",
]

MODEL = "platform"
DEFAULT_POLICY = RetryPolicy()
# The same refusal on this many uploads in a row, with none accepted between, is a request the
# service does not take (a wire setting), not bad files. Fewer when the refusal names a field
# the wire settings send; a folder of corrupt audio alone takes many more.
SAME_REFUSAL_LIMIT_NAMING_A_FIELD = 3
SAME_REFUSAL_LIMIT = 10
CONFIG_STATUSES = frozenset({400, 422})


class WireMismatch(RunStopped):
    """The service refuses what the wire settings send: the run stops, naming the setting."""


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
    unreadable_limit: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Stop polling a job after this many status answers in a row that cannot be"
        " read with the wire settings; its record stays open for a rerun.",
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
        gate: ModelGate,
        flags: PlatformFlags,
        config_hash: str,
        s3_client: Any,
        location: OutputLocation,
        flow_run_id: str,
        credentials_block: str,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.client = client
        self.pool = pool
        self.gate = gate
        gate.listeners.append(pool.set_ceiling)
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
        self.credentials_block = credentials_block
        self._refusal: tuple[int | None, str | None] | None = None
        self._same_refusals = 0

    def note_upload(self, refused: BadInput | None) -> None:
        """Count identical refusals in a row; stop the run when they say "not these files"."""
        if refused is None or refused.status not in CONFIG_STATUSES:
            self._refusal, self._same_refusals = None, 0
            return
        key = (refused.status, refused.detail)
        self._same_refusals = self._same_refusals + 1 if key == self._refusal else 1
        self._refusal = key
        setting = self.client.wire.setting_for(refused.detail or "")
        limit = SAME_REFUSAL_LIMIT_NAMING_A_FIELD if setting else SAME_REFUSAL_LIMIT
        if self._same_refusals < limit:
            return
        where = f"; the answer names `wire.{setting}`" if setting else ""
        raise WireMismatch(
            f"The Platform API refused {self._same_refusals} uploads in a row with the same "
            f"answer (HTTP {refused.status}: {refused.detail}){where}. That is the request, not "
            "the files: check the `wire` settings of the Modulate Platform Credentials block "
            f"{self.credentials_block!r} (docs/platform.md, Wire settings), then rerun."
        )

    def write(self, table: str, rows: list[dict[str, Any]], fragment_seed: str) -> None:
        """Write one fragment (deterministic name: a rerun overwrites) and count ledger rows."""
        if not rows:
            return
        fragment_id = hashlib.sha256(f"{self.config_hash}:{fragment_seed}".encode()).hexdigest()
        write_fragment(self.location, table, rows, fragment_id=fragment_id[:16])
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
        except Deferred as exc:
            status = DEFERRED if exc.kind == "quota" else DEFERRED_CONCURRENCY
            for rest in pending[i:]:
                rest.error = "deferred"
                failed.append(run.ledger_row(rest, status, error="Deferred", detail=exc.reason))
            break
        except AuthError as exc:
            raise RunStopped(str(exc)) from None
        except BadInput as exc:
            run.note_upload(exc)
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
        run.note_upload(None)
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
        it: its files fail, its record closes), "timeout" or "unreadable" (its status answers
        could not be read with the wire settings). After the last two the files fail for now
        and the record stays open, so a rerun re-attaches.
    """
    logger = get_run_logger()
    job_id = record.job_id
    assert job_id is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + poll.job_timeout_s
    interval = poll.initial_interval_s
    unreadable = 0
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
            if status.outcome in ("completed", "failed"):
                break
            unreadable = unreadable + 1 if status.outcome == "unreadable" else 0
            if unreadable:
                logger.warning("job %s: status answer %d of %d in a row not readable: %s",
                               job_id, unreadable, poll.unreadable_limit, status.problem)
            if unreadable >= poll.unreadable_limit:
                await asyncio.to_thread(save_status, run.location, job_id, status.raw)
                detail = (f"unreadable job status: {status.problem} (fix the Platform "
                          "Credentials block's wire settings and rerun: it re-attaches)")
                return await _leave_open(run, record, "unreadable", "UnreadableJobStatus", detail)
        if loop.time() + interval > deadline:
            detail = f"poll timeout after {poll.job_timeout_s:g} s"
            logger.warning("job %s: %s; a rerun re-attaches to it", job_id, detail)
            return await _leave_open(run, record, "timeout", "PollTimeout", detail)
        await asyncio.sleep(interval)
        interval = min(poll.max_interval_s, interval * poll.backoff)

    await asyncio.to_thread(save_status, run.location, job_id, status.raw)
    results, ledger = _result_rows(run, record, status)
    await asyncio.to_thread(run.write, "platform_results", results, f"results:{job_id}")
    await asyncio.to_thread(run.write, "files", ledger, f"final:{job_id}")
    record.closed, record.status, record.error = True, status.outcome, status.error
    await asyncio.to_thread(save_record, run.location, record)
    run.jobs[status.outcome] += 1
    logger.info("job %s: %s (%d files)", job_id, status.outcome, len(ledger))
    return status.outcome


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
    """One POST under a slot and the run's gate, through the one retry loop."""
    async with run.pool.wanted():
        return await call_with_retries(
            send, gate=run.gate, policy=run.policy, slot=run.pool.slot, rng=run.rng
        )


async def _close(
    run: PlatformRun, record: JobRecord, how: str, error_class: str, detail: str
) -> str:
    """Close a job whose files all failed here (they may go into a new job on a rerun)."""
    rows = [run.ledger_row(f, "failed", error=error_class, detail=detail)
            for f in record.files if f.posted]
    await asyncio.to_thread(run.write, "files", rows, f"{how}:{record.job_id}")
    for f in record.files:
        f.outcome = "failed" if f.posted else None
    record.closed, record.status = True, how
    await asyncio.to_thread(save_record, run.location, record)
    run.jobs[how] += 1
    return how


async def _leave_open(
    run: PlatformRun, record: JobRecord, how: str, error_class: str, detail: str
) -> str:
    """Fail the job's files for now and keep its record open: a rerun re-attaches to it."""
    rows = [run.ledger_row(f, "failed", error=error_class, detail=detail)
            for f in record.files if f.posted]
    await asyncio.to_thread(run.write, "files", rows, f"{how}:{record.job_id}")
    run.jobs[how] += 1
    return how


def _result_rows(
    run: PlatformRun, record: JobRecord, status: JobStatus
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """platform_results and files rows of a finished job, one each per posted file.

    A file the status does not list takes the job's outcome and error (a failed job may list
    no files at all); each file's `outcome` is set on the record.
    """
    posted = [f for f in record.files if f.posted]
    matched = _match_files(posted, status.files)
    results: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for f in posted:
        jf = matched.get(f.file_id)
        outcome = (jf.outcome if jf is not None else None) or status.outcome
        ok = outcome == "completed" and jf is not None and bool(jf.result)
        if ok:
            error = None
        elif outcome == "completed":
            error = "the completed job's status has no result for this file"
        else:
            error = ((jf.error if jf is not None else None) or status.error
                     or f"job status {status.status!r}")
        f.outcome = "completed" if ok else "failed"
        results.append(_result_row(run, record, f, jf, status, error))
        ledger.append(run.ledger_row(f, "completed") if ok else
                      run.ledger_row(f, "failed", error="PlatformJobFailed", detail=error))
    return results, ledger


def _match_files(posted: list[JobFileRecord], listed: list[JobFile]) -> dict[str, JobFile]:
    """Pair our files with the status's: by the service's file id, then by name, then the one
    left on each side."""
    by_id = {jf.file_id: jf for jf in listed if jf.file_id}
    unmatched = list(listed)
    matched: dict[str, JobFile] = {}
    for f in posted:
        jf = by_id.get(f.platform_file_id or "")
        if jf is None:
            jf = next((j for j in unmatched if j.filename == f.filename), None)
        if jf is not None and jf in unmatched:
            unmatched.remove(jf)
            matched[f.file_id] = jf
    left = [f for f in posted if f.file_id not in matched]
    if len(left) == 1 and len(unmatched) == 1:
        matched[left[0].file_id] = unmatched[0]
    return matched


def _result_row(
    run: PlatformRun, record: JobRecord, f: JobFileRecord, jf: JobFile | None,
    status: JobStatus, error: str | None,
) -> dict[str, Any]:
    result = jf.result if jf is not None else {}
    synthetic = result.get("synthetic_voice")
    synthetic = synthetic if isinstance(synthetic, dict) else {}
    confidence = synthetic.get("confidence")
    return {
        "job_id": record.job_id,
        "file_id": f.file_id,
        "config_hash": run.config_hash,
        "platform_file_id": f.platform_file_id,
        "filename": f.filename,
        "status": (jf.status if jf is not None else None) or status.status,  # as the API wrote it
        "error": error,
        "raw_json": json.dumps(result, sort_keys=True) if result else None,
        "transcript_text": jf.transcript_text if jf is not None else None,
        "emotion_json": _json_or_none(result.get("emotion")),
        "demographics_json": _json_or_none(result.get("demographics")),
        "synthetic_voice_verdict": synthetic.get("verdict"),
        "synthetic_voice_confidence": (
            float(confidence) if isinstance(confidence, (int, float)) else None
        ),
        "model": MODEL,
        "date": f.date,
    }


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def _bucket_key(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _files_seed(record: JobRecord) -> str:
    return hashlib.sha256("".join(sorted(f.file_id for f in record.files)).encode()).hexdigest()
