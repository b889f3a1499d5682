"""Runs sharing one org's limit (issue 11, "Fair sharing"): each a flow run in its own process.

Every run has its own emulator key (an emulator org of its own, so the emulator counts
its calls in flight apart) and its own blocks, but every limits block names the org
"shared": one Prefect limit `modulate:shared:vfast` of C for all of them. The emulator's
per-run counts are sampled together every 50 ms (bench/services.py), so their sum is the
org's calls in flight.

* pair: run A starts alone; once it holds every slot (C of its calls in flight), run B
  starts. Measured: from B's flow-run start until B has floor(C/2) calls in flight (target
  <= 5 s), and the pair's calls in flight over C while both have work, from B's start to
  the first of their last calls (target >= 0.95 of C/L: with a fixed latency L, calls in
  flight / C is files/s over C/L).
* three: three runs at once on two process workers; calls in flight over C from the last
  run's start to the first run's last call (target >= 0.95), and never more than C.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
import time
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.schemas.objects import FlowRun
from rich.console import Console
from rich.table import Table

from bench.fleet import MODEL, Fleet, running_fleet
from bench.services import InFlight, bench_files, sample_in_flight, start_services, upload
from tasks.slots import limit_name

__all__ = ["SHARED_ORGS", "print_shared", "run_shared", "targets"]

ORGANIZATION = "shared"
PAIR = ("shared-a", "shared-b")
THREE = ("shared-c", "shared-d", "shared-e")
SHARED_ORGS = [*PAIR, *THREE]
WORKERS = 2
# L = 2 s (not the contenders' 0.5 s): C/L = 12.5 files/s, so run A (48 s alone) still has
# work when run B's process is up (worker poll + process start: 10-20 s on loaded cores),
# with few files for the loaded machine to read and write.
LATENCY_S = 2.0
FIRST_FILES = 600
SECOND_FILES = 200
THREE_FILES = 200
QUICK_FILES = {"first": 100, "second": 40, "three": 30}
BUCKET = "shared-audio"
PREFIX = "shared/"
HOLDS_ALL_TIMEOUT_S = 180.0
RUNS_TIMEOUT_S = 600.0
MAX_HANDOFF_S = 5.0
MIN_BUSY = 0.95


def run_shared(
    *, concurrent: int, console: Console, latency_s: float = LATENCY_S, quick: bool = False
) -> dict[str, Any]:
    """Start the services and a fleet of two workers; run the pair, then the three."""
    sizes = QUICK_FILES if quick else {
        "first": FIRST_FILES, "second": SECOND_FILES, "three": THREE_FILES
    }
    with (start_services(SHARED_ORGS, concurrent) as services,
          tempfile.TemporaryDirectory(prefix="modulate-bench-shared-") as tmp):
        console.print(f"shared: {sizes['first']} files to moto, a Prefect server, "
                      f"{WORKERS} process workers")
        upload(services, BUCKET, bench_files(sizes["first"], PREFIX))
        services.set_latency(latency_s)
        with running_fleet(Path(tmp), WORKERS) as fleet:
            measured = asyncio.run(_measure(fleet, services, sizes, concurrent, console))
    return {"latency_s": latency_s, **measured}


async def _measure(
    fleet: Fleet, services: Any, sizes: dict[str, int], concurrent: int, console: Console
) -> dict[str, Any]:
    for name in SHARED_ORGS:
        await fleet.save_run_blocks(
            services, name=name, bucket=BUCKET, organization=ORGANIZATION, concurrent=concurrent
        )
    limit = limit_name(ORGANIZATION, MODEL)
    first, second = PAIR
    console.print(f"shared: run A on {sizes['first']} files; run B once A holds all {concurrent}")
    with sample_in_flight(services.emulator_url, list(PAIR), MODEL) as seen:
        a = await fleet.run(blocks=first, prefix=PREFIX, files=sizes["first"])
        await _until(lambda: seen.latest(first) >= concurrent, HOLDS_ALL_TIMEOUT_S,
                     f"run A holding all {concurrent} slots")
        b = await fleet.run(blocks=second, prefix=PREFIX, files=sizes["second"])
        pair_runs = await fleet.wait_final([a, b], RUNS_TIMEOUT_S)
    pair = _pair(seen, pair_runs, concurrent)
    pair["slots_held_after"] = await fleet.active_slots(limit)
    console.print(f"shared: three runs of {sizes['three']} files at once on {WORKERS} workers")
    with sample_in_flight(services.emulator_url, list(THREE), MODEL) as seen:
        ids: list[UUID] = [
            await fleet.run(blocks=name, prefix=PREFIX, files=sizes["three"]) for name in THREE
        ]
        three_runs = await fleet.wait_final(ids, RUNS_TIMEOUT_S)
    three = _three(seen, three_runs, concurrent)
    three["slots_held_after"] = await fleet.active_slots(limit)
    stats = services.stats_all(SHARED_ORGS, MODEL)
    return {
        "concurrent": concurrent,
        "workers": WORKERS,
        "files": sizes,
        "pair": pair,
        "three": three,
        "max_in_flight_per_run": {org: s["max_in_flight"] for org, s in stats.items()},
        "completed_per_run": {org: s["completed"] for org, s in stats.items()},
    }


def _pair(seen: InFlight, runs: list[FlowRun], concurrent: int) -> dict[str, Any]:
    first, second = PAIR
    b_start = _started(seen, runs[1])
    half = math.floor(concurrent / 2)
    reached = seen.first(second, at_least=half, after=b_start)
    end = min(seen.last(first) or 0.0, seen.last(second) or 0.0)
    return {
        "states": [r.state.name if r.state else None for r in runs],
        "b_started_s": round(b_start, 2),
        "a_last_call_s": round(seen.last(first) or 0.0, 2),
        "b_half_after_s": round(reached - b_start, 2) if reached is not None else None,
        "both_busy_window_s": round(max(0.0, end - b_start), 2),
        "busy_of_limit": round(seen.mean_total(b_start, end) / concurrent, 3),
        "host_cpu_busy": round(seen.host_busy(b_start, end), 3),
        "max_total_in_flight": seen.max_total(),
    }


def _three(seen: InFlight, runs: list[FlowRun], concurrent: int) -> dict[str, Any]:
    start = max(_started(seen, run) for run in runs)
    end = min(seen.last(org) or 0.0 for org in THREE)
    return {
        "states": [r.state.name if r.state else None for r in runs],
        "all_busy_window_s": round(max(0.0, end - start), 2),
        "busy_of_limit": round(seen.mean_total(start, end) / concurrent, 3),
        "host_cpu_busy": round(seen.host_busy(start, end), 3),
        "max_total_in_flight": seen.max_total(),
    }


def _started(seen: InFlight, run: FlowRun) -> float:
    """A flow run's start on the sampler's clock (the server's clock is this machine's)."""
    if run.start_time is None:
        raise RuntimeError(f"flow run {run.name} never started: {run.state}")
    return run.start_time.timestamp() - seen.wall_start


async def _until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)  # the sampler's interval: a condition poll, not a delay


def targets(shared: dict[str, Any]) -> list[dict[str, Any]]:
    pair, three, c = shared["pair"], shared["three"], shared["concurrent"]
    half = pair["b_half_after_s"]
    rows = [
        ("shared: B holds floor(C/2) after (s)", "never" if half is None else half,
         f"<= {MAX_HANDOFF_S}", half is not None and half <= MAX_HANDOFF_S),
        ("shared: pair busy of C/L", pair["busy_of_limit"], f">= {MIN_BUSY}",
         pair["busy_of_limit"] >= MIN_BUSY),
        ("shared: three runs busy of C/L", three["busy_of_limit"], f">= {MIN_BUSY}",
         three["busy_of_limit"] >= MIN_BUSY),
        ("shared: max in flight, all runs (sampled)",
         max(pair["max_total_in_flight"], three["max_total_in_flight"]), f"<= {c}",
         max(pair["max_total_in_flight"], three["max_total_in_flight"]) <= c),
        ("shared: slots held afterwards", pair["slots_held_after"] + three["slots_held_after"],
         "0", pair["slots_held_after"] + three["slots_held_after"] == 0),
    ]
    return [{"target": t, "value": v, "mark": m, "pass": bool(ok)} for t, v, m, ok in rows]


def print_shared(shared: dict[str, Any], console: Console) -> None:
    pair, three = shared["pair"], shared["three"]
    table = Table(title=f"Shared limit: C = {shared['concurrent']}, L = {shared['latency_s']} "
                  "s, one Prefect limit, "
                  f"{shared['workers']} process workers, files {shared['files']}")
    for column in ("runs", "states", "window s", "busy of C/L", "host CPU busy",
                   "max in flight (sum)", "B floor(C/2) after s", "slots held after"):
        table.add_column(column)
    half = pair["b_half_after_s"]
    table.add_row("pair (B starts once A holds all)", ", ".join(map(str, pair["states"])),
                  f"{pair['both_busy_window_s']:.1f}", f"{pair['busy_of_limit']:.3f}",
                  f"{pair['host_cpu_busy']:.2f}", str(pair["max_total_in_flight"]),
                  "never" if half is None else f"{half:.1f}", str(pair["slots_held_after"]))
    table.add_row("three at once", ", ".join(map(str, three["states"])),
                  f"{three['all_busy_window_s']:.1f}", f"{three['busy_of_limit']:.3f}",
                  f"{three['host_cpu_busy']:.2f}", str(three["max_total_in_flight"]), "",
                  str(three["slots_held_after"]))
    console.print(table)
