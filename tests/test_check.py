"""`modulate-flows check` on the real stack with each thing broken in turn, and `run` end to end.

The commands run in-process through typer's CliRunner (in a thread: they start their own
event loop) against the session's Prefect test server, moto and the emulator.
"""

from __future__ import annotations

import asyncio
import re

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
from prefect_aws import S3Bucket
from pydantic import SecretStr
from typer.testing import CliRunner, Result

import store as output
from blocks import ModelLimit, ModulateCredentials, OrgLimits, ParquetOutput, PlatformCredentials
from modulate_flows.cli import app
from modulate_flows.samples import speech_wav
from store.location import OutputLocation
from tests.conftest import OrgEnv

CANARY = "canary-key-7f3e9a-never-printed"


async def _invoke(*args: str) -> Result:
    return await asyncio.to_thread(CliRunner().invoke, app, list(args))


def _row(result: Result, check: str) -> str:
    """The text of the table row whose first line holds `check`, its cells joined by " | "."""
    lines = result.output.splitlines()
    start = next((i for i, line in enumerate(lines) if check in line), None)
    assert start is not None, f"no row {check!r} in:\n{result.output}"
    cells: list[list[str]] = []
    for line in lines[start:]:
        if not line.startswith("│"):  # the rule below the row, or the table's end
            break
        for i, cell in enumerate(line.strip("│").split("│")):
            if i == len(cells):
                cells.append([])
            if cell.strip():
                cells[i].append(cell.strip())
    return " | ".join(" ".join(parts) for parts in cells)


def _squashed(text: str) -> str:
    """Text without whitespace: a narrow column folds a command at any character."""
    return "".join(text.split())


def _check_args(env: OrgEnv, **names: str) -> list[str]:
    blocks = {"credentials": env.block, "limits": env.block, "output": env.block,
              "bucket": env.block, "platform-credentials": env.block, **names}
    args = ["check", "--prefix", "calls/", "--pattern", "*.wav"]
    for option, name in blocks.items():
        args += [f"--{option}", name]
    return args


async def test_check_passes_then_names_each_broken_thing(org_env: OrgEnv) -> None:
    env = org_env
    env.services.upload(env.bucket, {f"calls/c{i}.wav": speech_wav(0.5, seed=i) for i in range(3)})
    limits = await OrgLimits.aload(env.block)

    # Limits not synced yet: the two limit rows fail, and say which command syncs them.
    result = await _invoke(*_check_args(env))
    assert result.exit_code == 1, result.output
    row = _row(result, f"limit modulate:{env.org}:stt")
    assert "FAIL" in row and "not synced" in row
    assert _squashed(f"modulate-flows limits sync --block {env.block}") in _squashed(row)

    await limits.sync()
    result = await _invoke(*_check_args(env))
    assert result.exit_code == 0, result.output
    for check in ("Prefect API", "block Modulate Credentials", "block Modulate Org Limits",
                  f"limit modulate:{env.org}:svd", "output root", "Modulate key",
                  "Platform credentials"):
        assert re.search(r"\bok\b", _row(result, check)), _row(result, check)
    assert "3 objects match '*.wav'" in _row(result, "input bucket")
    assert "0 audio seconds" in _row(result, "Modulate key")  # what the probe cost

    # A limit changed in the block but not synced.
    changed = OrgLimits(organization=env.org, models={**limits.models, "stt": ModelLimit(
        concurrent=6)})
    await changed.asave(f"{env.block}-changed", overwrite=True)
    result = await _invoke(*_check_args(env, limits=f"{env.block}-changed"))
    assert result.exit_code == 1
    assert "Prefect holds 4 at once; the block says 6" in _row(result, f"modulate:{env.org}:stt")

    # A missing block: its row names the type and the commands; what needs it is skipped.
    result = await _invoke(*_check_args(env, credentials="no-such-credentials"))
    assert result.exit_code == 1
    row = _row(result, "block Modulate Credentials 'no-such-credentials'")
    assert "FAIL" in row and "does not exist" in row
    assert "modulate-flows blocks from-env --name no-such-credentials" in row
    assert "skipped" in _row(result, "Modulate key")

    # An unreadable bucket (it does not exist).
    aws = env.services.aws_credentials()
    await S3Bucket(bucket_name="no-such-bucket", credentials=aws).asave(
        f"{env.block}-nobucket", overwrite=True
    )
    result = await _invoke(*_check_args(env, bucket=f"{env.block}-nobucket"))
    assert result.exit_code == 1
    assert "NoSuchBucket" in _row(result, "input bucket")

    # An unwritable output root: an s3:// bucket that does not exist, and a local path
    # under a regular file.
    (env.output.parent / "a-file").write_text("not a directory")
    for name, root, credentials in [
        ("nos3", "s3://no-such-output-bucket/parquet", aws),
        ("nodir", str(env.output.parent / "a-file" / "parquet"), None),
    ]:
        await ParquetOutput(root=root, aws_credentials=credentials).asave(
            f"{env.block}-{name}", overwrite=True
        )
        result = await _invoke(*_check_args(env, output=f"{env.block}-{name}"))
        assert result.exit_code == 1, result.output
        row = _row(result, "output root")
        assert "FAIL" in row and "cannot write under" in row

    # A key the service refuses, and Platform credentials it refuses: never printed.
    await ModulateCredentials(
        api_key=SecretStr(CANARY), base_url=env.services.emulator_url
    ).asave(f"{env.block}-badkey", overwrite=True)
    platform = await PlatformCredentials.aload(env.block)
    await PlatformCredentials(
        account_uuid=platform.account_uuid, api_key=SecretStr(CANARY),
        base_url=env.services.emulator_url,
    ).asave(f"{env.block}-badplatform", overwrite=True)
    names = {
        "credentials": f"{env.block}-badkey", "platform-credentials": f"{env.block}-badplatform"
    }
    result = await _invoke(*_check_args(env, **names))
    assert result.exit_code == 1
    assert "refused" in _row(result, "Modulate key") and "FAIL" in _row(result, "Modulate key")
    assert "FAIL" in _row(result, "Platform credentials")
    assert CANARY not in result.output
    assert "2 of" in result.output and "checks failed" in result.output


async def test_run_command_runs_a_flow_through_prefect_with_the_summary(org_env: OrgEnv) -> None:
    env = org_env
    env.services.upload(
        env.bucket,
        {
            **{f"inbox/call-{i}.wav": speech_wav(1.0, seed=100 + i) for i in range(4)},
            "inbox/empty.wav": b"",
            "inbox/notes.txt": b"not audio",
        },
    )
    await (await OrgLimits.aload(env.block)).sync()
    result = await _invoke(
        "run", "stt", "--bucket-block", env.block, "--prefix", "inbox/",
        "--credentials", env.block, "--limits", env.block, "--output", env.block,
        "--chunk-size", "2",
    )
    assert result.exit_code == 0, result.output
    assert "Completed with failures" in result.output  # the empty file
    assert "100%" in result.output  # the bar ended full
    # completed, failed, skipped, deferred
    assert re.search(r"stt\s*│\s*4\s*│\s*1\s*│\s*1\s*│\s*0\s*│", result.output), result.output
    assert "empty" in _row(result, "empty.wav")

    # The run is a Prefect flow run (it shows in the UI), named after the command.
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(like_="adhoc-stt-"))
        )
    assert any(r.state and r.state.name == "Completed with failures" for r in runs)
    rows = output.read_table(OutputLocation(root=str(env.output)), "files").to_pylist()
    assert sorted(r["status"] for r in rows) == ["completed"] * 4 + ["failed", "skipped"]
    assert {r["flow_run_id"] for r in rows} <= {str(r.id) for r in runs}


async def test_run_command_names_a_missing_block_before_any_run(prefect_server: None) -> None:
    result = await _invoke("run", "svd", "--limits", "no-such-limits")
    assert result.exit_code == 2
    assert "The Modulate Org Limits block 'no-such-limits' does not exist" in result.output
    assert _squashed("modulate-flows limits sync --block no-such-limits") in _squashed(
        result.output
    )
    assert "Traceback" not in result.output
