"""`modulate-flows usage`: each model's audio hours this billing period, read from the ledger.

The same figures as a run's table artifact (tasks/budget.py), per model of the Org Limits
block and per model the `usage` table has rows for, with a bar chart of hours per day.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tasks.budget import BudgetReport

__all__ = ["usage"]

CHART_WIDTH = 40  # characters of the longest bar
BAR = "█"


def usage(
    block: Annotated[
        str, typer.Option(help="Name of the Org Limits block, and of the Parquet Output block.")
    ] = "modulate",
    output_block: Annotated[
        str | None, typer.Option(help="Name of the Parquet Output block, if not --block.")
    ] = None,
    as_of: Annotated[
        datetime | None, typer.Option(help="Reckon the period and forecast as of this UTC time.")
    ] = None,
) -> None:
    """Print each model's audio hours this billing period, its limit, and when it runs out."""
    reports = asyncio.run(_reports(block, output_block or block, as_of))
    console = Console()
    if not reports:
        console.print(f"No models in the Org Limits block {block!r} and no usage yet.")
        return
    first = reports[0]
    table = Table(
        title=f"Audio hours, billing period {first.period_start} to {first.period_end}"
    )
    for column in ("model", "used h", "limit h", "used", "h/day (7 days)", "runs out"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for report in reports:
        share = report.used_hours / report.limit_hours if report.limit_hours else 0.0
        table.add_row(
            report.model, f"{report.used_hours:g}", f"{report.limit_hours:g}", f"{share:.0%}",
            f"{report.pace_hours_per_day:g}", report.run_out_text(),
        )
    console.print(table)
    for report in reports:
        if report.daily_hours:
            console.print(_chart(report))


async def _reports(block: str, output_block: str, as_of: datetime | None) -> list[BudgetReport]:
    from blocks import OrgLimits, ParquetOutput
    from tasks.budget import usage_report
    from tasks.usage import usage_models

    limits, output = await asyncio.gather(
        OrgLimits.aload(block), ParquetOutput.aload(output_block)
    )
    location = output.location()
    models = sorted(set(limits.models) | set(await asyncio.to_thread(usage_models, location)))
    return [await usage_report(limits, model, location, now=as_of) for model in models]


def _chart(report: BudgetReport) -> Table:
    chart = Table(title=f"{report.model}: hours per day", show_header=False, box=None)
    chart.add_column("day")
    chart.add_column("bar")
    chart.add_column("hours", justify="right")
    top = max(report.daily_hours.values()) or 1.0
    for day, hours in sorted(report.daily_hours.items()):
        chart.add_row(day.isoformat(), BAR * max(1, round(CHART_WIDTH * hours / top)), f"{hours:g}")
    return chart
