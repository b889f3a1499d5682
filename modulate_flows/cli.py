"""The `modulate-flows` command: the demo, the emulator, and the org's limits.

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
from rich.console import Console

from modulate_flows.blocks_cli import blocks_app
from modulate_flows.platform_cli import platform_app

__all__ = ["app"]

app = typer.Typer(help="Prefect flows for Modulate's speech APIs.", no_args_is_help=True)
limits_app = typer.Typer(help="The organisation's per-model limits.", no_args_is_help=True)
app.add_typer(limits_app, name="limits")
app.add_typer(platform_app, name="platform")
app.add_typer(blocks_app, name="blocks")
console = Console()
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
    block: Annotated[str, typer.Option(help="Name of the Modulate Org Limits block.")] = "modulate",
) -> None:
    """Create or update one Prefect concurrency limit per model of the org."""
    from blocks import OrgLimits

    async def sync() -> dict[str, int]:
        return await (await OrgLimits.aload(block)).sync()

    for name, limit in asyncio.run(sync()).items():
        console.print(f"{name}: {limit} at once")


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
