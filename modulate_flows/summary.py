"""What landed, read back from the Parquet: the summary the demo and `modulate-flows run` print.

Tables are read with pyarrow (a local root or s3://, through the output block's filesystem)
and queried with DuckDB, as a data team would.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.markup import escape

from modulate_flows.console import print_rows
from store.fragments import read_table
from store.location import OutputLocation

__all__ = ["print_summary"]

_TABLES = ("files", "detection_summary", "utterances", "redactions")


def print_summary(
    location: OutputLocation,
    console: Console,
    *,
    model: str | None = None,
    uri_prefix: str | None = None,
    redacted_audio: str | None = None,
) -> None:
    """Print files by model and status, why files failed, and what each model produced.

    Args:
        location: The output root.
        console: Where to print.
        model: Only this model's rows (all models when None).
        uri_prefix: Only files whose source URI starts with this (e.g. s3://bucket/calls/).
        redacted_audio: Where the redacted MP3s went, to say so.
    """
    con = duckdb.connect()
    for name, table in _read(location, model, uri_prefix).items():
        con.register(name, table)

    ledger = con.execute(
        "select model, count(*) filter (status = 'completed'),"
        " count(*) filter (status = 'failed'), count(*) filter (status = 'skipped'),"
        " count(*) filter (status = 'deferred_quota'),"
        " coalesce(round(sum(audio_duration_ms) / 60000.0, 1), 0)"
        " from files group by all order by 1"
    ).fetchall()
    print_rows(
        console,
        "Files by model and status (the files table)",
        ("model", "completed", "failed", "skipped", "deferred", "audio minutes"),
        [tuple(escape(str(value)) for value in row) for row in ledger],
        numeric=("completed", "failed", "skipped", "deferred", "audio minutes"),
    )
    problems = con.execute(
        "select source_uri, string_agg(model, ', ' order by model), status, min(error_detail)"
        " from files where status in ('failed', 'skipped') group by source_uri, status order by 1"
    ).fetchall()
    if problems:
        print_rows(
            console,
            "Why files failed or were skipped (error_detail in the files table)",
            ("file", "models", "status", "why"),
            [
                (escape(uri.rsplit("/", 1)[-1]), models, status, escape(why or ""))
                for uri, models, status, why in problems
            ],
            wide=("why",),
        )
    console.print(_produced(con, redacted_audio))
    console.print(f"\n[bold]Parquet[/]: {location.uri('<table>')}/model=<model>/date=<YYYY-MM-DD>/")
    if not location.is_s3:
        console.print(
            "Query it with DuckDB (uv run python, then import duckdb):\n"
            f"  duckdb.sql(\"select model, status, count(*) from read_parquet("
            f"'{location.uri('files')}/**/*.parquet', hive_partitioning=true) group by all\")",
            soft_wrap=True,
        )


def _read(
    location: OutputLocation, model: str | None, uri_prefix: str | None
) -> dict[str, pa.Table]:
    files = read_table(location, "files")
    if model is not None:
        files = files.filter(pc.equal(files["model"], model))
    if uri_prefix is not None:
        files = files.filter(pc.starts_with(files["source_uri"], uri_prefix))
    tables = {"files": files}
    for name in _TABLES[1:]:
        table = read_table(location, name)
        # Only rows of the files selected above (same model, same inputs).
        keep = pc.is_in(table["file_id"], value_set=files["file_id"])
        if model is not None:
            keep = pc.and_(keep, pc.equal(table["model"], model))
        tables[name] = table.filter(keep)
    return tables


def _produced(con: duckdb.DuckDBPyConnection, redacted_audio: str | None) -> str:
    parts = []
    (utterances,) = con.execute("select count(*) from utterances").fetchone() or (0,)
    if utterances:
        parts.append(f"Utterances: {utterances}.")
    verdicts = con.execute(
        "select verdict, count(*) from detection_summary group by all order by 1"
    ).fetchall()
    if verdicts:
        parts.append(f"Synthetic-voice verdicts: {dict(verdicts)}.")
    files, ranges = con.execute(
        "select count(*), coalesce(sum(redaction_count), 0) from redactions"
    ).fetchone() or (0, 0)
    if files:
        where = f", MP3s under {redacted_audio}" if redacted_audio else ""
        parts.append(f"Redacted files: {files} ({ranges} ranges){where}.")
    return "  ".join(parts) or "No transcripts, detections or redactions for these files yet."
