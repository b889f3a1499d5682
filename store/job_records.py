"""The durable record of every Platform job: which S3 files belong to it, and how far it got.

One JSON object per job under ``<output root>/_state/platform_jobs/``, replaced whole at
every change (a rename locally, one PUT on S3: both atomic), in one of three directories:

* ``open/<job_id>.json``: jobs not closed yet. A rerun re-attaches to these, and reads only
  these, so start-up costs what is open, not every job ever written.
* ``failed/<job_id>.json``: closed jobs with a file that did not complete. A rerun reads
  them to count how often each file was in a failed job (the resubmission bound).
* ``closed/<job_id>.json``: closed jobs whose every file completed; never read again.

``status/<job_id>.json`` keeps the raw JSON of the job's last status answer. Why JSON and not
Parquet is in docs/platform.md. Plain pyarrow filesystems, no Prefect.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import pyarrow.fs as pafs
from pydantic import BaseModel, Field

__all__ = [
    "STATE_DIR",
    "JobFileRecord",
    "JobRecord",
    "failed_submissions",
    "load_open_records",
    "save_record",
    "save_status",
]

STATE_DIR = "_state/platform_jobs"
_TEMP_PREFIX = "_tmp-"


class _Location(Protocol):
    def filesystem(self) -> tuple[pafs.FileSystem, str]: ...


class JobFileRecord(BaseModel):
    """One S3 file of a job: where it came from and whether the service has it."""

    file_id: str
    source_uri: str
    etag: str
    size_bytes: int
    date: str
    filename: str
    posted: bool = False
    platform_file_id: str | None = None
    attempts: int = 0
    submission: int = Field(
        1, ge=1, description="1 in the file's first job; n + 1 after n failed jobs."
    )
    error: str | None = Field(None, description="Log-safe reason it was not posted.")
    outcome: Literal["completed", "failed"] | None = Field(
        None, description="How the file ended once its job closed."
    )
    submitted_at: datetime | None = None


class JobRecord(BaseModel):
    """A Platform job as this project knows it; `closed` once its rows are written."""

    job_id: str | None = None
    config_hash: str
    files: list[JobFileRecord]
    finalized: bool = False
    closed: bool = False
    status: str | None = None
    error: str | None = Field(None, description="The service's error text for the job.")
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def save_record(location: _Location, record: JobRecord) -> None:
    """Write the job's record whole where its state says; a closed job leaves `open/`."""
    if record.job_id is None:
        raise ValueError("a job record is saved once the service gave it a job_id")
    fs, base = location.filesystem()
    kind = _kind(record)
    _write(fs, f"{base}/{STATE_DIR}/{kind}", f"{record.job_id}.json",
           record.model_dump_json(indent=1).encode())
    if kind != "open":
        _delete(fs, f"{base}/{STATE_DIR}/open/{record.job_id}.json")


def save_status(location: _Location, job_id: str, raw: Any) -> None:
    """Keep the raw JSON of a job's last status answer beside its record."""
    fs, base = location.filesystem()
    _write(fs, f"{base}/{STATE_DIR}/status", f"{job_id}.json",
           json.dumps(raw, sort_keys=True).encode())


def load_open_records(location: _Location, config_hash: str) -> list[JobRecord]:
    """The open jobs of this config, oldest first; reads nothing but `open/`.

    Records of the earlier flat layout (``<job_id>.json`` directly under the state
    directory) are moved into the new one on the first call.
    """
    fs, base = location.filesystem()
    _migrate_flat_layout(location, fs, f"{base}/{STATE_DIR}")
    records = [r for r in _read_dir(fs, f"{base}/{STATE_DIR}/open")
               if r.config_hash == config_hash]
    return sorted(records, key=lambda r: r.created_at)


def failed_submissions(location: _Location, config_hash: str) -> Counter[str]:
    """For each file of this config, how many closed jobs it failed in."""
    fs, base = location.filesystem()
    counts: Counter[str] = Counter()
    for record in _read_dir(fs, f"{base}/{STATE_DIR}/failed"):
        if record.config_hash == config_hash:
            counts.update(f.file_id for f in record.files if f.outcome == "failed")
    return counts


def _kind(record: JobRecord) -> str:
    if not record.closed:
        return "open"
    posted = [f for f in record.files if f.posted]
    return "closed" if all(f.outcome == "completed" for f in posted) else "failed"


def _read_dir(fs: pafs.FileSystem, directory: str) -> list[JobRecord]:
    records = []
    for info in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        if info.base_name.startswith(_TEMP_PREFIX):
            continue  # a write in progress
        with fs.open_input_stream(info.path) as handle:
            records.append(JobRecord.model_validate_json(handle.read()))
    return records


def _migrate_flat_layout(location: _Location, fs: pafs.FileSystem, directory: str) -> None:
    selector = pafs.FileSelector(directory, allow_not_found=True)
    flat = [info for info in fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.base_name.endswith(".json")
            and not info.base_name.startswith(("_", _TEMP_PREFIX))]
    for info in flat:
        with fs.open_input_stream(info.path) as handle:
            record = JobRecord.model_validate_json(handle.read())
        if record.closed and record.status == "completed":
            for f in record.files:  # the flat layout kept no per-file outcome
                f.outcome = f.outcome or ("completed" if f.posted else None)
        save_record(location, record)
        _delete(fs, info.path)


def _write(fs: pafs.FileSystem, directory: str, name: str, data: bytes) -> None:
    fs.create_dir(directory, recursive=True)
    target = f"{directory}/{name}"
    if isinstance(fs, pafs.LocalFileSystem):
        temp = f"{directory}/{_TEMP_PREFIX}{name}"
        with fs.open_output_stream(temp) as handle:
            handle.write(data)
        fs.move(temp, target)
    else:  # one PUT: an object store replaces the whole object atomically
        with fs.open_output_stream(target) as handle:
            handle.write(data)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass
