"""The durable record of every Platform job: which S3 files belong to it, and how far it got.

One JSON object per job at ``_state/platform_jobs/<job_id>.json`` under the output root,
replaced whole at every change: a rename locally, one PUT on S3, both atomic. A record
changes several times in a job's life, which a Parquet table would have to compact; why
JSON and not Parquet is in docs/platform.md. A rerun reads them to re-attach to open jobs
and never posts again a file that belongs to a recorded job.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.fs as pafs
from pydantic import BaseModel, Field

from store.location import OutputLocation

__all__ = ["STATE_DIR", "JobFileRecord", "JobRecord", "load_records", "save_record"]

STATE_DIR = "_state/platform_jobs"


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
    error: str | None = Field(None, description="Log-safe reason it was not posted.")
    submitted_at: datetime | None = None


class JobRecord(BaseModel):
    """A Platform job as this project knows it; `closed` once its rows are written."""

    job_id: str | None = None
    config_hash: str
    files: list[JobFileRecord]
    finalized: bool = False
    closed: bool = False
    status: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def save_record(location: OutputLocation, record: JobRecord) -> None:
    """Write the job's record whole: a rename locally, one PUT on S3 (both atomic)."""
    assert record.job_id is not None
    fs, base = location.filesystem()
    directory = f"{base}/{STATE_DIR}"
    fs.create_dir(directory, recursive=True)
    data = record.model_dump_json(indent=1).encode()
    target = f"{directory}/{record.job_id}.json"
    if isinstance(fs, pafs.LocalFileSystem):
        temp = f"{directory}/_tmp-{record.job_id}.json"
        with fs.open_output_stream(temp) as handle:
            handle.write(data)
        fs.move(temp, target)
    else:
        with fs.open_output_stream(target) as handle:
            handle.write(data)


def load_records(location: OutputLocation, config_hash: str) -> list[JobRecord]:
    """Every job recorded under this output root for this config, oldest first."""
    fs, base = location.filesystem()
    selector = pafs.FileSelector(f"{base}/{STATE_DIR}", allow_not_found=True)
    records = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        if info.base_name.startswith("_"):
            continue  # a write in progress
        with fs.open_input_stream(info.path) as handle:
            record = JobRecord.model_validate_json(handle.read())
        if record.config_hash == config_hash:
            records.append(record)
    return sorted(records, key=lambda r: r.created_at)
