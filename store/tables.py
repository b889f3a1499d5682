"""The pyarrow schemas of every output table, and the only place they are defined.

Each table maps to its schema and key columns. The tables other than ``files`` and
``platform_results`` are a file's child rows: they carry the ``flow_run_id`` of the attempt
that wrote them, so compaction keeps the rows of the attempt the ``files`` ledger keeps
(store/winners.py). Every column carries a one-line
``description`` in its field metadata for the docs generator. Columns are only ever added,
and only as nullable ones, so files written under an older ``SCHEMA_VERSION`` stay readable.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

__all__ = [
    "CHILD_TABLES",
    "DESCRIPTION_KEY",
    "FILE_STATUSES",
    "LEDGER_TABLE",
    "PARTITION_COLUMNS",
    "SCHEMA_VERSION",
    "TABLES",
    "check_partition",
    "config_hash_for",
    "empty_table",
    "file_schema",
    "file_id_for",
    "group_columns",
    "to_table",
]

# 2: child tables gained flow_run_id (nullable; version-1 rows read it as null).
SCHEMA_VERSION = 2
DESCRIPTION_KEY = b"description"
# Hive partition columns, in path order. They close every schema because that is where
# pyarrow, DuckDB and polars put partition columns when they read the dataset back.
PARTITION_COLUMNS: tuple[str, str] = ("model", "date")
FILE_STATUSES = frozenset(
    {"completed", "failed", "deferred_quota", "deferred_budget", "deferred_concurrency",
     "skipped"}
)

FILE_ID_HEX_CHARS = 16
CONFIG_HASH_HEX_CHARS = 12

# Partition values become directory names, so they are held to a path-safe alphabet.
_MODEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIMESTAMP = pa.timestamp("us", tz="UTC")


def _field(name: str, type_: pa.DataType, description: str, *, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={DESCRIPTION_KEY: description})


def _schema(
    *fields: pa.Field, key: tuple[str, ...] = ("file_id", "config_hash"), child: bool = True
) -> pa.Schema:
    """Wrap table-specific fields in the columns every table shares; keys are not null.

    A child table (a file's rows other than its ledger row) also gets ``flow_run_id``.
    """
    head = [
        _field(
            "schema_version",
            pa.int16(),
            "Version of the schema the row was written with.",
            nullable=False,
        ),
        _field(
            "file_id",
            pa.string(),
            "Stable id of the input object version: sha256(source_uri + LF + etag)[:16].",
            nullable="file_id" not in key,
        ),
        _field(
            "config_hash",
            pa.string(),
            "sha256 of the canonical JSON of the job options, first 12 hex chars.",
            nullable="config_hash" not in key,
        ),
    ]
    body = [f.with_nullable(False) if f.name in key else f for f in fields]
    if child:
        body.append(
            _field(
                "flow_run_id",
                pa.string(),
                "Prefect flow run of the attempt that wrote the row; it matches files.flow_run_id.",
            )
        )
    tail = [
        _field(
            "model",
            pa.string(),
            "Model or API that produced the row (Hive partition).",
            nullable=False,
        ),
        _field(
            "date",
            pa.string(),
            "UTC date (YYYY-MM-DD) the audio object was last modified in S3 (Hive partition).",
            nullable=False,
        ),
    ]
    return pa.schema(head + body + tail)


def _with_fields(schema: pa.Schema, *fields: pa.Field) -> pa.Schema:
    """``schema`` with each field of the same name as one of ``fields`` replaced by it."""
    for field in fields:
        schema = schema.set(schema.get_field_index(field.name), field)
    return schema


TABLES: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    "files": (
        _schema(
            _field("source_uri", pa.string(), "s3:// URI of the input audio object."),
            _field("etag", pa.string(), "S3 ETag of the input object version that was processed."),
            _field("size_bytes", pa.int64(), "Size of the input object in bytes."),
            _field(
                "status",
                pa.string(),
                "Outcome: completed, failed, deferred_quota, deferred_budget,"
                " deferred_concurrency or skipped.",
                nullable=False,
            ),
            _field("error_class", pa.string(), "Error class name when the file did not complete."),
            _field("error_detail", pa.string(), "Log-safe error detail (never transcript text)."),
            _field("attempts", pa.int32(), "Number of API attempts made for the file."),
            _field("audio_duration_ms", pa.int64(), "Audio duration in milliseconds."),
            _field("started_at", _TIMESTAMP, "When processing of the file started (UTC)."),
            _field("finished_at", _TIMESTAMP, "When processing of the file finished (UTC)."),
            _field("flow_run_id", pa.string(), "Prefect flow run that processed the file."),
            _field("output_uri", pa.string(), "s3:// URI of the redacted MP3 (redaction only)."),
            child=False,
        ),
        ("file_id", "config_hash"),
    ),
    "transcripts": (
        _schema(
            _field("text", pa.string(), "Full transcript text of the file."),
            _field("duration_ms", pa.int64(), "Audio duration reported by the API, milliseconds."),
            _field("language", pa.string(), "Main language of the transcript."),
            _field("utterance_count", pa.int32(), "Number of utterances in the transcript."),
        ),
        ("file_id", "config_hash"),
    ),
    "utterances": (
        _schema(
            _field("idx", pa.int32(), "0-based position of the utterance in the file."),
            _field("utterance_uuid", pa.string(), "Utterance id returned by the API."),
            _field("start_ms", pa.int64(), "Utterance start offset in milliseconds."),
            _field("end_ms", pa.int64(), "Utterance end offset in milliseconds."),
            _field("duration_ms", pa.int64(), "Utterance duration in milliseconds."),
            _field("speaker", pa.int32(), "Speaker number from diarization."),
            _field("language", pa.string(), "Language detected for the utterance."),
            _field("text", pa.string(), "Utterance text."),
            _field("emotion", pa.string(), "Emotion label, when emotion signal was requested."),
            _field("accent", pa.string(), "Accent label, when accent signal was requested."),
            _field("deepfake_score", pa.float64(), "Synthetic-voice score, when requested."),
            key=("file_id", "config_hash", "idx"),
        ),
        ("file_id", "config_hash", "idx"),
    ),
    "detections": (
        _schema(
            _field("frame_idx", pa.int32(), "0-based position of the frame in the file."),
            _field("start_ms", pa.int64(), "Frame start offset in milliseconds."),
            _field("end_ms", pa.int64(), "Frame end offset in milliseconds."),
            _field("verdict", pa.string(), "Frame verdict returned by the synthetic voice API."),
            _field("confidence", pa.float64(), "Confidence of the frame verdict, 0 to 1."),
            key=("file_id", "config_hash", "frame_idx"),
        ),
        ("file_id", "config_hash", "frame_idx"),
    ),
    "detection_summary": (
        _schema(
            _field(
                "verdict",
                pa.string(),
                "synthetic if any frame is, else non-synthetic; no-content if every frame is.",
            ),
            _field(
                "max_synthetic_confidence",
                pa.float64(),
                "Highest confidence among synthetic frames.",
            ),
            _field(
                "synthetic_fraction",
                pa.float64(),
                "Synthetic frames divided by frames with content.",
            ),
            _field("frames", pa.int32(), "Number of frames analysed."),
            _field("duration_ms", pa.int64(), "Audio duration in milliseconds."),
        ),
        ("file_id", "config_hash"),
    ),
    "redactions": (
        _schema(
            _field("redacted_text", pa.string(), "Transcript text with PII replaced."),
            _field(
                "redaction_ranges",
                pa.list_(pa.struct([("start_ms", pa.int64()), ("end_ms", pa.int64())])),
                "Time ranges of the audio that were redacted, milliseconds.",
            ),
            _field("redaction_count", pa.int32(), "Number of redacted ranges."),
            _field("redacted_audio_uri", pa.string(), "s3:// URI of the redacted MP3."),
            _field("duration_ms", pa.int64(), "Audio duration in milliseconds."),
        ),
        ("file_id", "config_hash"),
    ),
    "platform_results": (
        _schema(
            _field("job_id", pa.string(), "Platform API job id."),
            _field("platform_file_id", pa.string(), "File id assigned by the Platform API."),
            _field("filename", pa.string(), "File name sent to the Platform API."),
            _field("status", pa.string(), "File status reported by the Platform API."),
            _field("error", pa.string(), "Error reported by the Platform API for the file."),
            _field("raw_json", pa.string(), "Full Platform API result for the file, as JSON."),
            _field("transcript_text", pa.string(), "Transcript text extracted from the result."),
            _field("emotion_json", pa.string(), "Emotion results extracted from the result, JSON."),
            _field(
                "demographics_json",
                pa.string(),
                "Demographics results extracted from the result, JSON.",
            ),
            _field("synthetic_voice_verdict", pa.string(), "Synthetic voice verdict for the file."),
            _field(
                "synthetic_voice_confidence",
                pa.float64(),
                "Confidence of the synthetic voice verdict, 0 to 1.",
            ),
            key=("job_id", "file_id"),
            child=False,
        ),
        ("job_id", "file_id"),
    ),
    "usage": (
        _with_fields(
            _schema(
                _field("audio_duration_ms", pa.int64(), "Audio duration the call was charged, ms."),
                _field("finished_at", _TIMESTAMP, "When the call finished (UTC)."),
                _field("flow_run_id", pa.string(), "Prefect flow run that made the call."),
                child=False,
            ),
            _field(
                "model",
                pa.string(),
                "Model whose monthly limit the call used (Hive partition).",
                nullable=False,
            ),
            _field(
                "date",
                pa.string(),
                "UTC date (YYYY-MM-DD) the call finished (Hive partition, unlike other tables).",
                nullable=False,
            ),
        ),
        ("file_id", "config_hash"),
    ),
}


LEDGER_TABLE = "files"
# A file's rows beside its ledger row; they follow the ledger's winner (store/winners.py).
# `usage` is partitioned by the day a call finished, not the object's date: it keeps the
# latest row of a key instead, like platform_results.
CHILD_TABLES = frozenset(
    name for name in TABLES if name not in {LEDGER_TABLE, "platform_results", "usage"}
)


def group_columns(name: str) -> tuple[str, ...]:
    """The columns one attempt wins for: a file version under a config, or a Platform job's file."""
    return ("job_id", "file_id") if name == "platform_results" else ("file_id", "config_hash")


def file_id_for(source_uri: str, etag: str) -> str:
    """Return the stable id of one version of an input object."""
    digest = hashlib.sha256(f"{source_uri}\n{etag}".encode())
    return digest.hexdigest()[:FILE_ID_HEX_CHARS]


def config_hash_for(options: Mapping[str, Any]) -> str:
    """Return the hash of a job's options: sorted keys, compact separators, UTF-8."""
    canonical = json.dumps(options, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:CONFIG_HASH_HEX_CHARS]


def check_partition(model: str, date: str) -> None:
    """Raise ValueError unless ``model`` is path-safe and ``date`` is YYYY-MM-DD."""
    if not _MODEL_RE.fullmatch(model):
        raise ValueError("'model' must be letters, digits, '.', '-' or '_'")
    if not _DATE_RE.fullmatch(date):
        raise ValueError("'date' must be YYYY-MM-DD")


def empty_table(name: str) -> pa.Table:
    """Return a table with no rows and the full schema of ``name``."""
    return _schema_of(name).empty_table()


def to_table(name: str, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a table of ``name`` from row dicts, validated against its schema.

    ``schema_version`` is filled in; a missing nullable column becomes null. Raises
    ValueError naming the column for an unknown key, a null in a not-null column, a value
    of the wrong type or a partition value that is not path-safe. Messages never quote a
    value, since values can be transcript text.
    """
    schema = _schema_of(name)
    known = set(schema.names)
    for row in rows:
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(f"table {name!r} has no column {unknown[0]!r}")
    arrays = []
    for field in schema:
        if field.name == "schema_version":
            values: list[Any] = [row.get("schema_version", SCHEMA_VERSION) for row in rows]
        else:
            values = [row.get(field.name) for row in rows]
        arrays.append(_to_array(name, field, values))
    table = pa.Table.from_arrays(arrays, schema=schema)
    _check_values(name, table)
    return table


def file_schema(name: str) -> pa.Schema:
    """The schema stored inside a table's files: partition columns live in the path instead."""
    schema = _schema_of(name)
    for column in PARTITION_COLUMNS:
        schema = schema.remove(schema.get_field_index(column))
    return schema


def _schema_of(name: str) -> pa.Schema:
    try:
        return TABLES[name][0]
    except KeyError:
        raise ValueError(f"unknown table {name!r}; expected one of {sorted(TABLES)}") from None


def _to_array(table: str, field: pa.Field, values: list[Any]) -> pa.Array:
    try:
        array = pa.array(values, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        # Re-raised without the cause: pyarrow's message quotes the offending value.
        bad = next((type(v).__name__ for v in values if not _fits(v, field.type)), "value")
        raise ValueError(
            f"column {field.name!r} of table {table!r} is {field.type}; got a {bad}"
        ) from None
    if not field.nullable and array.null_count:
        raise ValueError(f"column {field.name!r} of table {table!r} must not be null")
    return array


def _fits(value: Any, type_: pa.DataType) -> bool:
    try:
        pa.array([value], type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return False
    return True


def _check_values(name: str, table: pa.Table) -> None:
    for partition in table.group_by(list(PARTITION_COLUMNS)).aggregate([]).to_pylist():
        check_partition(partition["model"], partition["date"])
    if name == "files":
        bad = set(table.column("status").unique().to_pylist()) - FILE_STATUSES
        if bad:
            raise ValueError(
                f"column 'status' of table 'files' has {sorted(bad)}; "
                f"expected one of {sorted(FILE_STATUSES)}"
            )
