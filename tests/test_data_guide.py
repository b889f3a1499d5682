"""docs/data.md stays true: its column tables match store/tables.py and its examples run.

The examples run against Parquet from a real transcription and synthetic-voice run (moto S3,
the emulator, real Prefect), with `ROOT` pointing at the output directory.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import duckdb
import pandas as pd
import polars as pl
import pytest

from flows import detect_synthetic_voice, transcribe
from modulate import RetryPolicy
from modulate_flows.samples import bad_files, speech_wav
from store.tables import TABLES
from tasks import runner
from tasks.runner import RunSettings
from tasks.s3 import S3Input

DOCS = Path(__file__).resolve().parents[1] / "docs"
CODE_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
GOOD_FILES = 5


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schema_docs", DOCS / "gen_schema_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snippets() -> list[str]:
    return CODE_BLOCK.findall((DOCS / "data.md").read_text())


def test_column_tables_are_up_to_date() -> None:
    generator = load_generator()
    text = (DOCS / "data.md").read_text()
    assert generator.update(text) == text, "run: uv run python docs/gen_schema_docs.py"


def test_every_table_and_column_is_documented() -> None:
    text = (DOCS / "data.md").read_text()
    for name, (schema, _) in TABLES.items():
        section = text.split(f"### `{name}`\n", 1)[1].split("\n### ", 1)[0]
        for field in schema:
            assert f"| `{field.name}` |" in section, (name, field.name)


async def test_examples_run_on_real_output(org_env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "DEFAULT_POLICY", RetryPolicy.for_tests())
    files = {f"calls/call-{i:02d}.wav": speech_wav(2.0, seed=i) for i in range(GOOD_FILES)}
    files |= {key: data for key, (data, _) in bad_files().items() if key.endswith("corrupt.wav")}
    org_env.services.upload(org_env.bucket, files)
    source = S3Input(bucket_block=org_env.block, prefix="calls/")
    settings = RunSettings(
        credentials_block=org_env.block, limits_block=org_env.block, output_block=org_env.block
    )
    stt = await transcribe(source=source, settings=settings, return_state=True)
    svd = await detect_synthetic_voice(source=source, settings=settings, return_state=True)
    assert stt.name == svd.name == "Completed with failures"  # the corrupt file

    blocks = snippets()
    assert [("pandas" in b, "duckdb" in b, "polars" in b) for b in blocks] == [
        (True, False, False),
        (False, True, False),
        (False, False, True),
    ]
    results: dict[str, Any] = {}
    for code in blocks:
        namespace: dict[str, Any] = {"ROOT": str(org_env.output)}
        exec(compile(code, "docs/data.md", "exec"), namespace)  # noqa: S102 - the doc's own code
        results.update(namespace)

    assert len(results["named"]) == GOOD_FILES
    assert results["talk"].sum() > 0
    failures = results["failures"]
    assert set(failures.error_class) == {"BadInput"} and failures.n.sum() == 2  # stt and svd
    latest = results["latest"]
    assert len(latest) == (GOOD_FILES + 1) * 2
    assert len(results["exact"]) == len(pd.read_parquet(f"{org_env.output}/utterances")) > 0
    _one_row_per_key_for_every_reader(str(org_env.output))
    assert results["summary"]["files"].sum() == GOOD_FILES
    assert len(results["words"]) == GOOD_FILES and (results["words"]["words"] > 0).all()
    hours = results["hours"].groupby("model")["hours"].sum()
    assert hours["stt"] == hours["svd"] == pytest.approx(GOOD_FILES * 2.0 / 3600)


def _one_row_per_key_for_every_reader(root: str) -> None:
    """After a run: pandas, DuckDB and polars each see exactly one row per key, every table."""
    for table, (_, keys) in TABLES.items():
        if not os.path.isdir(f"{root}/{table}"):
            continue
        key = ["model", *keys]
        frame = pd.read_parquet(f"{root}/{table}")
        assert not frame.duplicated(key).any() and len(frame) > 0, table
        glob = f"{root}/{table}/**/*.parquet"
        counts = duckdb.connect().sql(  # not the default connection the guide's code used
            f"select count(*), count(distinct ({', '.join(key)})) "
            f"from read_parquet('{glob}', hive_partitioning = true)"
        ).fetchall()[0]
        assert counts == (len(frame), len(frame)), table
        lazy = pl.scan_parquet(glob, hive_partitioning=True)
        assert lazy.select(pl.len()).collect().item() == len(frame), table
        assert lazy.unique(subset=key).select(pl.len()).collect().item() == len(frame), table
