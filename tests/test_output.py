"""Parquet output: schemas, fragment writes, compaction, the ledger, and what readers see."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from moto.server import ThreadedMotoServer

from store import OutputLocation, compact, read_ledger, read_table, write_fragment
from store.tables import (
    PARTITION_COLUMNS,
    SCHEMA_VERSION,
    TABLES,
    config_hash_for,
    empty_table,
    file_id_for,
    to_table,
)

MODEL = "velma-2-stt-batch"
DATE = "2025-03-01"
T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def _file_row(file_id: str, status: str = "completed", **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "file_id": file_id,
        "config_hash": "cfg1",
        "model": MODEL,
        "date": DATE,
        "source_uri": f"s3://in/{file_id}.wav",
        "etag": "e",
        "size_bytes": 100,
        "status": status,
        "attempts": 1,
        "started_at": T0,
        "finished_at": T0 + dt.timedelta(seconds=5),
    }
    return row | extra


def _utterance(file_id: str, idx: int, text: str) -> dict[str, Any]:
    return {
        "file_id": file_id,
        "config_hash": "cfg1",
        "idx": idx,
        "text": text,
        "start_ms": idx * 1000,
        "end_ms": idx * 1000 + 900,
        "model": MODEL,
        "date": DATE,
    }


def _partition_files(root: Path, table: str, date: str = DATE) -> list[str]:
    directory = root / table / f"model={MODEL}" / f"date={date}"
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("_"))


# schemas


def test_every_column_has_a_description_and_keys_are_not_null() -> None:
    for name, (schema, keys) in TABLES.items():
        for field in schema:
            assert (field.metadata or {}).get(b"description"), f"{name}.{field.name}"
        for column in (*keys, "schema_version", *PARTITION_COLUMNS):
            assert not schema.field(column).nullable, f"{name}.{column}"
        assert tuple(schema.names[-2:]) == PARTITION_COLUMNS
        assert {"file_id", "config_hash"} <= set(schema.names)


def test_to_table_fills_version_and_nulls() -> None:
    table = to_table(
        "files",
        [{"file_id": "a", "config_hash": "c", "status": "failed", "model": MODEL, "date": DATE}],
    )
    assert table.schema == TABLES["files"][0]
    row = table.to_pylist()[0]
    assert row["schema_version"] == SCHEMA_VERSION
    assert row["finished_at"] is None and row["error_class"] is None
    assert empty_table("detections").schema == TABLES["detections"][0]


def test_to_table_rejects_unknown_column_by_name() -> None:
    with pytest.raises(ValueError, match="'transcript_txt'"):
        to_table(
            "transcripts",
            [
                {
                    "file_id": "a",
                    "config_hash": "c",
                    "model": MODEL,
                    "date": DATE,
                    "transcript_txt": "hi",
                }
            ],
        )


def test_to_table_errors_name_the_column_and_never_quote_values() -> None:
    base = {"file_id": "a", "config_hash": "c", "model": MODEL, "date": DATE}
    with pytest.raises(ValueError, match="'duration_ms'") as info:
        to_table("transcripts", [base | {"duration_ms": "my card number is 4111"}])
    assert "4111" not in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match="'config_hash'.*null"):
        to_table("transcripts", [base | {"config_hash": None}])
    with pytest.raises(ValueError, match="'status'"):
        to_table("files", [base | {"status": "done"}])
    with pytest.raises(ValueError, match="'date'"):
        to_table("transcripts", [base | {"date": "2025/03/01"}])
    with pytest.raises(ValueError, match="'model'"):
        to_table("transcripts", [base | {"model": "../escape"}])


def test_ids_are_stable_and_short() -> None:
    assert file_id_for("s3://b/a.wav", '"etag"') == file_id_for("s3://b/a.wav", '"etag"')
    assert len(file_id_for("s3://b/a.wav", "x")) == 16
    assert config_hash_for({"b": 1, "a": [1, 2]}) == config_hash_for({"a": [1, 2], "b": 1})
    assert len(config_hash_for({})) == 12


# writing and compaction (local)


def test_same_fragment_twice_leaves_one_copy(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    rows = [_file_row("a"), _file_row("b", date="2025-03-02")]
    assert write_fragment(location, "files", rows, fragment_id="chunk1") == 2
    assert write_fragment(location, "files", rows, fragment_id="chunk1") == 2
    assert _partition_files(tmp_path, "files") == ["part-chunk1-0.parquet"]
    assert read_table(location, "files").num_rows == 2
    assert write_fragment(location, "files", [], fragment_id="chunk2") == 0
    assert _partition_files(tmp_path, "files") == ["part-chunk1-0.parquet"]


def test_partition_columns_live_only_in_the_path(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    write_fragment(location, "files", [_file_row("a")], fragment_id="c1")
    stored = pq.read_schema(
        tmp_path / "files" / f"model={MODEL}" / f"date={DATE}" / "part-c1-0.parquet"
    )
    assert not set(PARTITION_COLUMNS) & set(stored.names)
    assert stored.field("status").metadata[b"description"]


def test_compact_keeps_the_latest_write_of_an_attempt_whole(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    # Rows without an attempt (schema version 1) count as one attempt: its latest write wins.
    old = [_utterance("a", 0, "old"), _utterance("a", 1, "old")]
    new = [_utterance("a", 1, "new"), _utterance("a", 2, "new")]
    write_fragment(location, "utterances", new, fragment_id="zzz-older-name")
    write_fragment(location, "utterances", old, fragment_id="aaa")
    write_fragment(location, "utterances", new, fragment_id="zzz-older-name")  # rewritten last
    compact(location, "utterances", MODEL, [DATE])
    (name,) = _partition_files(tmp_path, "utterances")
    assert name.startswith("part-compacted-")
    rows = read_table(location, "utterances").sort_by("idx").to_pylist()
    assert [(r["idx"], r["text"]) for r in rows] == [(1, "new"), (2, "new")]
    compact(location, "utterances", MODEL, [DATE])  # idempotent
    assert _partition_files(tmp_path, "utterances") == [name]


def test_compact_files_prefers_latest_finished_at(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    later = T0 + dt.timedelta(hours=1)
    write_fragment(
        location, "files", [_file_row("a", "completed", finished_at=later)], fragment_id="run2"
    )
    write_fragment(
        location, "files", [_file_row("a", "failed"), _file_row("b", "failed")], fragment_id="run1"
    )
    compact(location, "files", MODEL, [DATE, "2025-01-01"])  # a date with no partition is fine
    rows = {r["file_id"]: r["status"] for r in read_table(location, "files").to_pylist()}
    assert rows == {"a": "completed", "b": "failed"}


@pytest.mark.parametrize("read_whole", ["none", "one", "all"])
def test_compact_gives_the_same_rows_whether_fragments_are_read_whole_or_by_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_whole: str
) -> None:
    location = OutputLocation(root=str(tmp_path))
    later = T0 + dt.timedelta(hours=1)
    write_fragment(location, "files", [_file_row("a", "failed"), _file_row("b")], fragment_id="r1")
    write_fragment(
        location, "files", [_file_row("a", "completed", finished_at=later)], fragment_id="r2"
    )
    write_fragment(location, "utterances", [_utterance("a", 0, "old")], fragment_id="r1")
    write_fragment(location, "utterances", [_utterance("a", 0, "new"), _utterance("b", 0, "b")],
                   fragment_id="r2")
    sizes = [p.stat().st_size for p in (tmp_path / "files").rglob("*.parquet")]
    # "one": the budget holds the smaller files fragment, not both.
    budget = {"none": 0, "one": min(sizes), "all": sum(sizes) * 4}[read_whole]
    monkeypatch.setattr("store.compaction.FRAGMENT_READ_BYTES", budget)
    for table in ("files", "utterances"):
        compact(location, table, MODEL, [DATE])
        (name,) = _partition_files(tmp_path, table)
        assert name.startswith("part-compacted-")
    files = {r["file_id"]: r["status"] for r in read_table(location, "files").to_pylist()}
    assert files == {"a": "completed", "b": "completed"}
    texts = {r["file_id"]: r["text"] for r in read_table(location, "utterances").to_pylist()}
    assert texts == {"a": "new", "b": "b"}


def test_compact_after_a_crash_removes_duplicates(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    write_fragment(location, "files", [_file_row("a"), _file_row("b")], fragment_id="c1")
    directory = tmp_path / "files" / f"model={MODEL}" / f"date={DATE}"
    # A crash after the compacted file was written but before the inputs were deleted.
    (directory / "part-compacted-deadbeef-0.parquet").write_bytes(
        (directory / "part-c1-0.parquet").read_bytes()
    )
    assert read_table(location, "files").num_rows == 4
    compact(location, "files", MODEL, [DATE])
    assert read_table(location, "files").num_rows == 2


def test_readers_see_one_row_per_key_with_documented_types(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    write_fragment(location, "files", [_file_row("a"), _file_row("b")], fragment_id="c1")
    write_fragment(location, "files", [_file_row("b", "failed"), _file_row("c")], fragment_id="c2")
    compact(location, "files", MODEL, [DATE])
    glob = f"{tmp_path}/files/**/*.parquet"

    relation = duckdb.sql(f"select * from read_parquet('{glob}', hive_partitioning=true)")
    types = dict(zip(relation.columns, map(str, relation.types), strict=True))
    assert types["date"] == "DATE" and types["model"] == "VARCHAR"
    assert types["schema_version"] == "SMALLINT" and types["size_bytes"] == "BIGINT"
    assert types["finished_at"] == "TIMESTAMP WITH TIME ZONE"
    unique = duckdb.execute(
        "select count(*) = count(distinct (file_id, config_hash)), count(*) "
        f"from read_parquet('{glob}', hive_partitioning=true)"
    ).fetchone()
    assert unique == (True, 3)

    frame = pd.read_parquet(tmp_path / "files")
    assert len(frame) == 3
    assert isinstance(frame["model"].dtype, pd.CategoricalDtype)
    assert isinstance(frame["date"].dtype, pd.CategoricalDtype)
    assert str(frame["finished_at"].dtype) == "datetime64[us, UTC]"
    assert frame["size_bytes"].dtype == "int64" and frame["schema_version"].dtype == "int16"

    polars_frame = pl.read_parquet(glob, hive_partitioning=True)
    assert polars_frame.height == 3
    assert polars_frame.schema["model"] == pl.String
    assert polars_frame.schema["date"] == pl.Date
    assert polars_frame.schema["finished_at"] == pl.Datetime("us", "UTC")
    assert polars_frame.schema["schema_version"] == pl.Int16

    dataset = ds.dataset(tmp_path / "files", partitioning="hive")
    assert dataset.schema.field("date").type == pa.string()
    assert dataset.to_table().num_rows == 3


def test_read_table_fills_columns_missing_from_older_files(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    assert read_table(location, "files").schema == TABLES["files"][0]
    # A file from before output_uri existed: the same row without that column.
    old = to_table("files", [_file_row("a")]).drop_columns(["output_uri", *PARTITION_COLUMNS])
    directory = tmp_path / "files" / f"model={MODEL}" / f"date={DATE}"
    directory.mkdir(parents=True)
    pq.write_table(old, directory / "part-old-0.parquet")
    write_fragment(
        location, "files", [_file_row("b", output_uri="s3://out/b.mp3")], fragment_id="new"
    )
    table = read_table(location, "files")
    assert table.schema == TABLES["files"][0]
    assert dict(
        zip(
            table.column("file_id").to_pylist(), table.column("output_uri").to_pylist(), strict=True
        )
    ) == {"a": None, "b": "s3://out/b.mp3"}
    compact(location, "files", MODEL, [DATE])
    assert read_table(location, "files").num_rows == 2


def test_read_ledger_filters_by_model_and_config(tmp_path: Path) -> None:
    location = OutputLocation(root=str(tmp_path))
    assert read_ledger(location, MODEL, "cfg1") == {}
    write_fragment(
        location,
        "files",
        [
            _file_row("a", "completed"),
            _file_row("b", "failed"),
            _file_row("c", "completed", config_hash="cfg2"),
            _file_row("d", "completed", model="velma-2-svd-batch"),
        ],
        fragment_id="c1",
    )
    # An uncompacted retry: a later failure does not undo a completion.
    write_fragment(
        location,
        "files",
        [
            _file_row("a", "failed", finished_at=T0 + dt.timedelta(hours=2)),
            _file_row("b", "deferred_quota", finished_at=T0 + dt.timedelta(hours=1)),
        ],
        fragment_id="c2",
    )
    assert read_ledger(location, MODEL, "cfg1") == {"a": "completed", "b": "deferred_quota"}
    assert read_ledger(location, MODEL, "cfg2") == {"c": "completed"}
    assert read_ledger(location, MODEL, "nope") == {}


def test_location_never_shows_keys(tmp_path: Path) -> None:
    location = OutputLocation(
        root="s3://bucket/prefix/",
        s3_endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="AKIDSECRET",
        aws_secret_access_key="SKSECRET",
    )
    assert "SECRET" not in repr(location)
    assert location.uri("files") == "s3://bucket/prefix/files"
    assert OutputLocation(root=str(tmp_path / "x")).filesystem()[1] == str(tmp_path / "x")


# S3 (moto server)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_write_compact_and_read_on_s3(s3_endpoint: str) -> None:
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="results")
    location = OutputLocation(
        root="s3://results/runs/v1",
        s3_endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region="us-east-1",
    )
    rows = [_file_row("a", "failed"), _file_row("b")]
    write_fragment(location, "files", rows, fragment_id="c1")
    write_fragment(location, "files", rows, fragment_id="c1")
    write_fragment(
        location,
        "files",
        [_file_row("a", finished_at=T0 + dt.timedelta(hours=1))],
        fragment_id="c2",
    )
    assert read_table(location, "files").num_rows == 3
    compact(location, "files", MODEL, [DATE])
    fs, base = location.filesystem()
    listed = fs.get_file_info(pafs.FileSelector(f"{base}/files/model={MODEL}/date={DATE}"))
    names = [os.path.basename(info.path) for info in listed if info.is_file]
    assert len(names) == 1 and names[0].startswith("part-compacted-")
    assert read_ledger(location, MODEL, "cfg1") == {"a": "completed", "b": "completed"}
    assert read_table(location, "files").num_rows == 2
