"""Set-up errors say what to do: a missing block, a Prefect slow to start, narrow output."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from flows import transcribe
from modulate_flows.console import print_rows
from tasks.runner import RunSettings
from tasks.s3 import S3Input
from tests.conftest import OrgEnv

ROOT = Path(__file__).resolve().parents[1]


async def test_a_flow_with_missing_blocks_fails_at_once_naming_each(org_env: OrgEnv) -> None:
    state = await transcribe(
        source=S3Input(bucket_block=org_env.block),
        settings=RunSettings(
            credentials_block=org_env.block, limits_block="no-such-limits", output_block="no-out"
        ),
        return_state=True,
    )
    assert state.is_failed()
    message = state.message or ""
    assert "The Modulate Org Limits block 'no-such-limits' does not exist" in message
    assert "modulate-flows limits sync --block no-such-limits" in message
    assert "The Modulate Parquet Output block 'no-out' does not exist" in message
    assert "MODULATE_OUTPUT_ROOT" in message and "blocks from-env --name no-out" in message
    assert "Unable to find block document" not in message
    assert org_env.stats("stt")["requests"] == 0


def test_a_prefect_server_too_slow_to_start_says_which_setting_raises_the_bound(
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # 0 s: the wait ends before the server can answer, as a slow first start would.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "0",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "true",
    }
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILES_PATH", None)
    result = subprocess.run(
        [sys.executable, "-m", "modulate_flows", "check"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "did not answer within 0 s" in out
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=600" in out
    assert "Traceback" not in out


def test_tables_stay_readable_piped_and_narrow() -> None:
    why = "the service cannot decode it: The audio could not be processed. It may be corrupted."
    rows = [("corrupt.wav", "stt, svd", "failed", why)]
    columns = ("file", "models", "status", "why")

    piped = Console(file=io.StringIO(), width=160)
    print_rows(piped, "Why files failed", columns, rows, wide=("why",))
    text = piped.file.getvalue()  # type: ignore[attr-defined]
    assert any("corrupt.wav" in line and "stt, svd" in line and why[:40] in line
               for line in text.splitlines()), text

    narrow = Console(file=io.StringIO(), width=50)
    print_rows(narrow, "Why files failed", columns, rows, wide=("why",))
    text = narrow.file.getvalue()  # type: ignore[attr-defined]
    assert "- corrupt.wav" in text and "    status: failed" in text
    assert "│" not in text  # one block per row, not a table squeezed into 50 columns
