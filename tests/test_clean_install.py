"""A worker's install: the wheel without the local extra imports the flows and runs one.

Builds the wheel (`uv build`), installs it into a fresh venv (`uv venv`, `uv pip install`),
checks that moto and duckdb are absent (fastapi and uvicorn come with prefect's own server,
so they cannot be) and that `modulate-flows demo`
says how to add them, then runs the transcription flow from that venv against the session's
Prefect server, moto S3 and emulator (started separately, in this process).

Two to three minutes on a 2-core machine (most of it the Prefect test server), so it is off by
default: `MODULATE_CLEAN_INSTALL=1 uv run pytest
tests/test_clean_install.py -q`. uv resolves from its cache or the index it is configured with.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from prefect.settings import PREFECT_API_URL

from modulate_flows.samples import speech_wav

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("moto", "duckdb")
BOUND_S = 300

pytestmark = pytest.mark.skipif(
    os.environ.get("MODULATE_CLEAN_INSTALL") != "1",
    reason="set MODULATE_CLEAN_INSTALL=1 to build and install the wheel (two to three minutes)",
)

CHILD = """
import asyncio, importlib.util, json, sys
missing = [m for m in json.loads(sys.argv[2]) if importlib.util.find_spec(m) is None]
from flows import transcribe
from tasks.runner import RunSettings
from tasks.s3 import S3Input
name = sys.argv[1]
state = asyncio.run(transcribe(
    source=S3Input(bucket_block=name, prefix="in/"),
    settings=RunSettings(credentials_block=name, limits_block=name, output_block=name),
    return_state=True,
))
print(json.dumps({"missing": missing, "state": state.name, "flows_from": transcribe.fn.__module__,
                  "file": sys.modules["flows"].__file__}))
"""


def _uv(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    uv = shutil.which("uv")
    assert uv, "uv is not on PATH"
    done = subprocess.run([uv, *args], cwd=cwd, capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


async def test_the_wheel_without_the_local_extra_runs_a_flow(org_env, tmp_path: Path) -> None:
    dist, venv = tmp_path / "dist", tmp_path / "venv"
    _uv("build", "--wheel", "--out-dir", str(dist))
    [wheel] = dist.glob("*.whl")
    _uv("venv", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    _uv("pip", "install", "--python", str(python), str(wheel))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "UV_"))}
    demo = subprocess.run([str(venv / "bin" / "modulate-flows"), "demo"], capture_output=True,
                          text=True, timeout=BOUND_S, env=env, cwd=tmp_path)
    assert demo.returncode == 1
    assert 'pip install "modulate-flows[local]"' in demo.stdout.replace("\n", " ")

    org_env.services.upload(org_env.bucket, {
        f"in/call-{i}.wav": speech_wav(1.0, seed=i) for i in range(3)
    })
    env |= {
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }
    # Run from tmp_path, so the checkout is not on sys.path: the code comes from the wheel.
    child = subprocess.run(
        [str(python), "-c", CHILD, org_env.block, json.dumps(ABSENT)],
        capture_output=True, text=True, timeout=BOUND_S, env=env, cwd=tmp_path,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["missing"] == list(ABSENT)
    assert str(venv) in report["file"]
    assert report["state"] == "Completed"
    files = pd.read_parquet(org_env.output / "files")
    assert sorted(files.status) == ["completed"] * 3
