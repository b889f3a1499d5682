"""Turn the measured runs into ratios, PASS/FAIL per target, JSON and a rich table."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["machine", "print_runs", "print_targets", "targets", "write_json"]

# The marks of issue 16 (which raised DESIGN.md section 6's and issue 8's); reported, never
# asserted in tests.
MIN_OF_LIMIT = 0.97  # at N files
MIN_SMALL_OF_LIMIT = 0.93  # at the small size, where start-up weighs more
MIN_VS_PLAIN = 1.05  # at both sizes
MIN_VS_NAIVE = 2.0
MAX_RSS_GROWTH_MB = 50.0
MAX_CPU_MS_PER_FILE = 2.5


def machine() -> dict[str, Any]:
    """Cores, memory and versions of the machine the numbers come from."""
    import os

    import prefect

    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total_kb = int(meminfo.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(total_kb / 2**20, 1),
        "python": platform.python_version(),
        "prefect": prefect.__version__,
        "platform": platform.platform(),
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target with its measured value and whether it holds."""
    runs, params, ratios = results["contenders"], results["params"], results["ratios"]
    ours, concurrent = runs["ours"], params["concurrent"]
    small, files, floor = params["small_files"], params["files"], runs["floor"]["cpu_ms_per_file"]
    rows = [
        (f"files/s of C/L, {files} files", ratios["ours_of_limit"], f">= {MIN_OF_LIMIT}",
         ratios["ours_of_limit"] >= MIN_OF_LIMIT),
        (f"files/s of C/L, {small} files", ratios["ours_small_of_limit"],
         f">= {MIN_SMALL_OF_LIMIT}", ratios["ours_small_of_limit"] >= MIN_SMALL_OF_LIMIT),
        (f"vs plain script (a), {files} files", ratios["ours_vs_plain"],
         f">= {MIN_VS_PLAIN}x", ratios["ours_vs_plain"] >= MIN_VS_PLAIN),
        (f"vs plain script (a), {small} files", ratios["ours_small_vs_plain_small"],
         f">= {MIN_VS_PLAIN}x", ratios["ours_small_vs_plain_small"] >= MIN_VS_PLAIN),
        ("vs naive Prefect flow (b)", ratios["ours_vs_naive"], f">= {MIN_VS_NAIVE}x",
         ratios["ours_vs_naive"] >= MIN_VS_NAIVE),
        ("max in flight / concurrency rejections",
         f"{ours['max_in_flight']} / {ours['rejections'].get('concurrency', 0)}",
         f"<= {concurrent} / 0",
         ours["max_in_flight"] <= concurrent and not ours["rejections"].get("concurrency")),
        (f"RSS growth {small} -> {files} files",
         results["rss_growth_mb"], f"<= {MAX_RSS_GROWTH_MB} MB",
         results["rss_growth_mb"] <= MAX_RSS_GROWTH_MB),
        # The floor (c) is not a mark: it says how much of the figure the libraries cost.
        (f"CPU ms per file (our process; the floor (c): {floor:.2f})",
         ours["cpu_ms_per_file"], f"<= {MAX_CPU_MS_PER_FILE}",
         ours["cpu_ms_per_file"] <= MAX_CPU_MS_PER_FILE),
    ]
    return [
        {"target": name, "value": value, "mark": mark, "pass": bool(ok)}
        for name, value, mark, ok in rows
    ]


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")


def print_runs(results: dict[str, Any], console: Console) -> None:
    """One table of the contenders."""
    params = results["params"]
    table = Table(
        title=f"N = {params['files']} one-second WAVs, C = {params['concurrent']}, "
        f"L = {params['latency_s']} s, C/L = {params['limit_files_per_s']:.1f} files/s"
    )
    for column in ("contender", "files", "completed", "files/s", "of C/L", "max in flight",
                   "rejections", "CPU ms/file", "peak RSS MB", "host CPU busy"):
        left = column in ("contender", "rejections")
        table.add_column(column, justify="left" if left else "right")
    for name, run in results["contenders"].items():
        rejections = ", ".join(f"{k} {v}" for k, v in run["rejections"].items()) or "none"
        table.add_row(
            name, str(run["files"]), str(run["completed"]), f"{run['files_per_s']:.2f}",
            f"{run['of_limit']:.3f}", str(run["max_in_flight"]), rejections,
            f"{run['cpu_ms_per_file']:.2f}", f"{run['peak_rss_mb']:.0f}",
            f"{run['host_cpu_busy']:.2f}",
        )
    console.print(table)


def print_targets(rows: list[dict[str, Any]], console: Console) -> None:
    """PASS/FAIL of each target measured (none for a partial run of the contenders)."""
    if not rows:
        return
    verdicts = Table(title="Targets")
    for column in ("target", "value", "mark", "result"):
        verdicts.add_column(column)
    for row in rows:
        value = row["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        verdicts.add_row(
            row["target"], shown, row["mark"],
            "[green]PASS[/green]" if row["pass"] else "[red]FAIL[/red]",
        )
    console.print(verdicts)
