"""The demo: sample audio in a local S3, the emulator, the batch flows, a summary.

Everything listens on 127.0.0.1 and stops when the demo ends; the Parquet and the
Prefect database stay under the output directory for a look afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from blocks import ModelLimit, OrgLimits
from emulator import EmulatorConfig, Latency, ModelLimits, OrgConfig
from modulate_flows.console import print_rows
from modulate_flows.local import LocalServices, local_services, save_blocks
from modulate_flows.samples import bad_files, demo_files
from modulate_flows.summary import print_summary
from store.location import OutputLocation

__all__ = ["run_demo"]

ORG = "demo"
API_KEY = "demo-velma-key"  # the emulator's key; no real key is involved
BUCKET = "audio-inbox"
PREFIX = "calls/"
CONCURRENT = 4
MODELS = ("stt", "svd", "pii")


def run_demo(output: Path, files: int, console: Console) -> None:
    """Run transcription, detection and redaction over sample audio and print what landed."""
    parquet = output.resolve() / "parquet"
    config = EmulatorConfig(
        orgs=[
            OrgConfig(
                name=ORG,
                velma_keys=[API_KEY],
                models={m: ModelLimits(concurrent=CONCURRENT) for m in MODELS},
            )
        ],
        latency=Latency(mean_s=0.2, jitter_s=0.1),
    )
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        with console.status("Starting a local S3 (moto) and the Modulate emulator..."):
            services = stack.enter_context(local_services(config))
        samples = demo_files(files, prefix=PREFIX)
        samples.update({key: data for key, (data, _) in bad_files(prefix=PREFIX).items()})
        services.upload(BUCKET, samples)
        console.print(
            f"[bold]S3[/] {services.s3_endpoint} bucket [cyan]{BUCKET}[/]: {len(samples)} objects "
            f"({files} sample calls, {len(samples) - files} bad files).\n"
            f"[bold]Emulator[/] {services.emulator_url}, {CONCURRENT} calls at once per model."
        )
        states = asyncio.run(_run_flows(services, parquet, console))
        stats = services.emulator.state.stats()
    _print_summary(parquet, states, stats, console)
    console.print(f"\nDone in {time.monotonic() - started:.0f} s.")


async def _run_flows(services: LocalServices, parquet: Path, console: Console) -> dict[str, Any]:
    from flows import detect_synthetic_voice, redact_pii, transcribe
    from tasks.runner import RunSettings
    from tasks.s3 import S3Input

    await save_blocks(
        services,
        name="modulate",
        bucket=BUCKET,
        output_root=str(parquet),
        organization=ORG,
        api_key=API_KEY,
        limits={m: ModelLimit(concurrent=CONCURRENT) for m in MODELS},
    )
    # The flows' default S3 input block is "audio-inbox".
    await save_blocks(
        services,
        name=BUCKET,
        bucket=BUCKET,
        output_root=str(parquet),
        organization=ORG,
        api_key=API_KEY,
        limits={},
    )
    await (await OrgLimits.aload("modulate")).sync()
    source = S3Input(bucket_block=BUCKET, prefix=PREFIX)
    settings = RunSettings(chunk_size=10)
    states = {}
    for label, flow in [
        ("transcription", transcribe),
        ("synthetic-voice detection", detect_synthetic_voice),
        ("PII redaction", redact_pii),
    ]:
        with console.status(f"Running {label}..."):
            state = await flow(source=source, settings=settings, return_state=True)
        console.print(f"[bold]{label}[/]: [green]{state.name}[/] - {state.message}")
        states[label] = state
    return states


def _print_summary(
    parquet: Path, states: dict[str, Any], stats: dict[str, Any], console: Console
) -> None:
    print_summary(
        OutputLocation(root=str(parquet)), console, redacted_audio=f"s3://{BUCKET}/redacted/"
    )
    rows = [
        (
            model, str(CONCURRENT), str(s["max_in_flight"]), str(s["requests"]),
            str({k: v for k, v in s["rejections"].items() if v}),
        )
        for model, s in sorted(stats["orgs"][ORG].items())
        if s["requests"]
    ]
    print_rows(
        console,
        "The org's limit, as the emulator saw it",
        ("model", "limit", "max in flight", "requests", "rejections"),
        rows,
        numeric=("limit", "max in flight", "requests"),
        wide=("rejections",),
    )
