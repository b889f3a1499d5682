"""The `modulate-flows` command: the demo, the emulator, the org's limits, check and run.

Prefect is imported inside the commands, after the settings they need are in the
environment (a Prefect setting read at import time would ignore a later change). The demo
and the emulator need the `local` extra (moto, fastapi, uvicorn, duckdb), which a worker's
install does not carry; without it they say how to add it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from modulate_flows.blocks_cli import DEFAULT_BLOCK_NAME, DEFAULT_BUCKET_BLOCK_NAME, blocks_app
from modulate_flows.console import make_console, print_rows
from modulate_flows.platform_cli import platform_app
from modulate_flows.prefect_api import PrefectUnavailable, connect, connect_or_exit
from modulate_flows.usage_cli import usage

__all__ = ["app"]

app = typer.Typer(help="Prefect flows for Modulate's speech APIs.", no_args_is_help=True)
limits_app = typer.Typer(help="The organisation's per-model limits.", no_args_is_help=True)
app.add_typer(limits_app, name="limits")
app.add_typer(platform_app, name="platform")
app.add_typer(blocks_app, name="blocks")
app.command()(usage)
console = make_console()
# The block-name options `check` and `run` share (typer names each after its parameter).
CredentialsBlock = Annotated[str, typer.Option(help="Name of the Modulate Credentials block.")]
LimitsBlock = Annotated[str, typer.Option(help="Name of the Modulate Org Limits block.")]
OutputBlock = Annotated[str, typer.Option(help="Name of the Modulate Parquet Output block.")]
BucketBlock = Annotated[str, typer.Option(help="Name of the input S3 Bucket block.")]
# fastapi and uvicorn also come with prefect (its server), so moto and duckdb are what a
# worker's install lacks; all four are listed so a missing one is named whatever pulls it in.
LOCAL_STACK = ("moto", "fastapi", "uvicorn", "duckdb")


@app.command()
def demo(
    output: Annotated[Path, typer.Option(help="Where the Parquet and the Prefect database go.")] = (
        Path("demo-output")
    ),
    files: Annotated[int, typer.Option(min=1, max=500, help="Sample calls to generate.")] = 24,
) -> None:
    """Run the batch flows on sample audio against a local S3 and the emulator, then summarise."""
    _require_local_stack("demo")
    output.mkdir(parents=True, exist_ok=True)
    # A Prefect of its own under the output directory: the runs stay there to browse
    # with `prefect server start` afterwards, and nothing touches ~/.prefect.
    os.environ["PREFECT_HOME"] = str((output / "prefect").resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The demo prints its own summary; Prefect's per-task lines would drown it.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.pop("PREFECT_API_URL", None)
    connect_or_exit(console)
    from modulate_flows.demo import run_demo

    run_demo(output, files, console)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8765,
    config: Annotated[
        Path | None, typer.Option(help="Emulator config (JSON); the demo org when left out.")
    ] = None,
) -> None:
    """Serve the Modulate emulator on 127.0.0.1 until interrupted."""
    _require_local_stack("emulator")
    from emulator import EmulatorConfig, serve

    loaded = EmulatorConfig.load(config) if config else EmulatorConfig.default()
    console.print(f"Modulate emulator on http://127.0.0.1:{port} (stats at /_emulator/stats)")
    serve(loaded, port=port)


@limits_app.command("sync")
def limits_sync(
    block: LimitsBlock = DEFAULT_BLOCK_NAME,
) -> None:
    """Create or update one Prefect concurrency limit per model of the org."""
    connect_or_exit(console)
    from blocks import OrgLimits
    from blocks.loading import BlockNotLoaded, load_block

    async def sync() -> dict[str, int]:
        return await (await load_block(OrgLimits, block)).sync()

    try:
        synced = asyncio.run(sync())
    except BlockNotLoaded as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(2) from None
    for name, limit in synced.items():
        console.print(f"{name}: {limit} at once")


@app.command()
def check(
    credentials: CredentialsBlock = DEFAULT_BLOCK_NAME,
    limits: LimitsBlock = DEFAULT_BLOCK_NAME,
    output: OutputBlock = DEFAULT_BLOCK_NAME,
    bucket: BucketBlock = DEFAULT_BUCKET_BLOCK_NAME,
    prefix: Annotated[str, typer.Option(help="Input prefix to list.")] = "",
    pattern: Annotated[str, typer.Option(help="Glob the input keys must match.")] = "*",
    platform_credentials: Annotated[
        str | None,
        typer.Option(help="Modulate Platform Credentials block (checked if 'modulate' exists)."),
    ] = None,
) -> None:
    """Check everything a run needs, one row a check, with what to do; exit 1 if any fails.

    Nothing is billed: the key is proven by an STT stream ended before any audio.

    The Platform credentials are proven by the status of a made-up job id.
    """
    from modulate_flows.check import FAIL, OK, Check, CheckTargets, rows_for_table, run_checks

    targets = CheckTargets(
        credentials=credentials, limits=limits, output=output, bucket=bucket,
        prefix=prefix, pattern=pattern, platform_credentials=platform_credentials,
    )
    try:
        url = connect(console)
    except PrefectUnavailable as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        checks = [Check("Prefect API", FAIL, "not reachable (above: why)", "See above.")]
    else:
        checks = [Check("Prefect API", OK, url), *asyncio.run(run_checks(targets))]
    print_rows(
        console, "modulate-flows check", ("check", "result", "detail", "what to do"),
        rows_for_table(checks), wide=("detail", "what to do"),
    )
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        console.print(f"[red]{len(failed)} of {len(checks)} checks failed.[/red]")
        raise typer.Exit(1)
    console.print(f"[green]All {len(checks)} checks passed[/green] (or were skipped or warned).")


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="stt, vfast, svd or pii.")],
    bucket_block: BucketBlock = DEFAULT_BUCKET_BLOCK_NAME,
    prefix: Annotated[str, typer.Option(help="Only keys under this prefix.")] = "",
    pattern: Annotated[str, typer.Option(help="Glob on the key, e.g. *.wav.")] = "*",
    max_files: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many matching objects.")
    ] = None,
    credentials: CredentialsBlock = DEFAULT_BLOCK_NAME,
    limits: LimitsBlock = DEFAULT_BLOCK_NAME,
    output: OutputBlock = DEFAULT_BLOCK_NAME,
    chunk_size: Annotated[
        int | None, typer.Option(min=1, max=1000, help="Files per task (default 100).")
    ] = None,
    options: Annotated[
        str | None,
        typer.Option(help='The model\'s options as JSON, e.g. \'{"emotion_signal": true}\'.'),
    ] = None,
) -> None:
    """Run one batch flow now, through Prefect (it shows in the UI), with a progress bar.

    Exit status 1 if the run failed (a refused key, S3 down), 2 if a block is missing.

    A run whose files partly failed completes; the summary says why each failed.
    """
    import json

    from modulate_flows.adhoc import FLOW_NAMES, run_adhoc

    if model not in FLOW_NAMES:
        console.print(f"[red]MODEL must be one of {', '.join(FLOW_NAMES)}, not {model!r}.[/red]")
        raise typer.Exit(2)
    try:
        parsed = json.loads(options) if options else {}
    except json.JSONDecodeError as exc:
        console.print(f"[red]--options is not valid JSON: {exc}[/red]")
        raise typer.Exit(2) from None
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the bar, not per-task lines
    connect_or_exit(console)
    from blocks.loading import BlockNotLoaded
    from tasks.runner import RunSettings
    from tasks.s3 import S3Input

    source = S3Input(
        bucket_block=bucket_block, prefix=prefix, pattern=pattern, max_files=max_files
    )
    chunk = {"chunk_size": chunk_size} if chunk_size is not None else {}
    settings = RunSettings(
        credentials_block=credentials, limits_block=limits, output_block=output, **chunk
    )
    try:
        state = asyncio.run(run_adhoc(model, source, settings, parsed, console))
    except (BlockNotLoaded, ValueError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(2) from None
    if not state.is_completed():
        raise typer.Exit(1)


def _require_local_stack(command: str) -> None:
    missing = [name for name in LOCAL_STACK if importlib.util.find_spec(name) is None]
    if missing:
        console.print(
            f"`modulate-flows {command}` needs the local stack, which this install lacks "
            f"({', '.join(missing)}). Install it with `pip install \"modulate-flows[local]\"`, "
            "or run from a checkout with `uv run modulate-flows ...` (uv installs it by default).",
            markup=False,
        )
        raise typer.Exit(code=1)
