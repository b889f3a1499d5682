"""`modulate-flows run`: one batch flow, ad hoc, through Prefect, with a live progress bar.

The flow runs in this process against the configured Prefect API, so it shows in the UI
like any other run. The bar follows the run's own progress artifact (the runner updates
it every few seconds: files finished of those listed so far); the summary is read back
from the Parquet afterwards, the one the demo prints.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from typing import Any

import httpx
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

__all__ = ["FLOW_NAMES", "PROGRESS_POLL_SECONDS", "run_adhoc"]

PROGRESS_POLL_SECONDS = 1.0
# The CLI's MODEL argument and the batch flow each runs (flows/).
FLOW_NAMES = {
    "stt": "transcribe",
    "vfast": "transcribe_english_fast",
    "svd": "detect_synthetic_voice",
    "pii": "redact_pii",
}


async def run_adhoc(
    model: str,
    source: Any,  # tasks.s3.S3Input
    settings: Any,  # tasks.runner.RunSettings
    options: dict[str, Any],
    console: Console,
) -> Any:
    """Run the batch flow of `model` once; return its final state, after printing the summary.

    Raises BlockNotLoaded before any run starts when a block is missing, and ValueError
    when `options` do not fit the model.
    """
    from prefect_aws import S3Bucket

    import flows
    from blocks import ModulateCredentials, OrgLimits, ParquetOutput
    from blocks.loading import load_blocks
    from modulate_flows.summary import print_summary

    flow = getattr(flows, FLOW_NAMES[model])
    parameters: dict[str, Any] = {"source": source, "settings": settings}
    if options:
        parameters["options"] = _options_model(flow).model_validate(options)
    # The flow would fail on a missing block too; here it fails before a run exists.
    bucket, _, _, parquet = await load_blocks(
        (S3Bucket, source.bucket_block),
        (ModulateCredentials, settings.credentials_block),
        (OrgLimits, settings.limits_block),
        (ParquetOutput, settings.output_block),
    )
    run_name = f"adhoc-{model}-{uuid.uuid4().hex[:8]}"
    run = asyncio.ensure_future(
        flow.with_options(flow_run_name=run_name)(**parameters, return_state=True)
    )
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"{flow.name} (flow run {run_name})", total=100)
        while not run.done():
            await asyncio.wait({run}, timeout=PROGRESS_POLL_SECONDS)
            finished = await _progress(run_name)
            if finished is not None:
                progress.update(bar, completed=finished)
        if run.result().is_completed():
            progress.update(bar, completed=100)
    state = run.result()
    colour = "green" if state.is_completed() else "red"
    message = escape(state.message or "")
    console.print(f"[bold]{flow.name}[/]: [{colour}]{state.name}[/] - {message}")
    where = f"s3://{bucket.bucket_name}"
    print_summary(
        parquet.location(),
        console,
        model=model,
        uri_prefix=f"{where}/{source.prefix}",
        redacted_audio=f"{where}/redacted/" if model == "pii" else None,
    )
    return state


def _options_model(flow: Any) -> type[BaseModel]:
    """The pydantic type of the flow's `options` parameter (STTOptions, RedactionOptions)."""
    parameter = inspect.signature(flow.fn).parameters.get("options")
    if parameter is None:
        raise ValueError(f"{flow.name} takes no options")
    return type(parameter.default)


async def _progress(run_name: str) -> float | None:
    """The run's progress artifact (percent), or None before the run has made one."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterType,
        FlowRunFilter,
        FlowRunFilterName,
    )

    try:
        async with get_client() as client:
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"])),
                flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])),
            )
    except httpx.HTTPError:
        return None  # the bar waits for the next poll; the run itself goes on
    values = [a.data for a in artifacts if isinstance(a.data, (int, float))]
    return float(max(values)) if values else None
