"""Many workers on a real database (issue 16): eight runs on four workers, one org's limit.

The same fleet twice, first with the Prefect server on PostgreSQL (a temporary cluster,
bench/postgres.py), then on SQLite: four process workers, eight flow runs created at
once, every one with the same emulator key (so the emulator's `max_in_flight` is the org's,
exact) and the same limits block (one Prefect limit of C). Measured per database: files/s
from the first call to the last against C/L (target >= 0.9), the same from the first
flow-run start to the last end, the emulator's max in flight (never over C), the calls it
refused for concurrency (none: the runs together never sent more than C), the samples in
which the emulator had more calls in flight than the limit had slots leased, and the
limit's active slots afterwards (zero). When a run does not complete or a call is refused,
the workers' logs are kept and their folder printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench import postgres
from bench.fleet import MODEL, Fleet, running_fleet
from bench.services import (
    BenchServices,
    bench_files,
    polling,
    sample_in_flight,
    start_services,
    upload,
)
from tasks.slots import limit_name

__all__ = ["print_workers", "run_workers", "targets"]

ORGANIZATION = "fleet"
WORKERS = 4
RUNS = 8
FILES_PER_RUN = 300
QUICK_FILES_PER_RUN = 30
BUCKET = "fleet-audio"
PREFIX = "fleet/"
RUNS_TIMEOUT_S = 900.0
MIN_OF_LIMIT = 0.9
DATABASES = ("postgresql", "sqlite")


def run_workers(
    *, concurrent: int, latency_s: float, console: Console, quick: bool = False
) -> dict[str, Any]:
    """Both databases in turn, on one emulator and one moto."""
    files = QUICK_FILES_PER_RUN if quick else FILES_PER_RUN
    results: dict[str, Any] = {
        "concurrent": concurrent, "latency_s": latency_s, "workers": WORKERS, "runs": RUNS,
        "files_per_run": files,
    }
    with start_services([ORGANIZATION], concurrent) as services:
        upload(services, BUCKET, bench_files(files, PREFIX))
        services.set_latency(latency_s)
        for database in DATABASES:
            console.print(f"workers: Prefect server on {database}, {WORKERS} workers, "
                          f"{RUNS} runs of {files} files")
            with tempfile.TemporaryDirectory(prefix=f"modulate-bench-{database}-") as temp:
                home = Path(temp)
                with contextlib.ExitStack() as stack:
                    url = (stack.enter_context(postgres.temporary_cluster())
                           if database == "postgresql" else None)
                    fleet = stack.enter_context(running_fleet(home, WORKERS, url))
                    results[database] = run = asyncio.run(
                        _measure(fleet, services, files, concurrent, latency_s)
                    )
                # Kept once the workers have stopped, so their logs are whole.
                if run["states"] != ["Completed"] or run["rejections"]:
                    run["worker_logs"] = _keep_logs(home, database)
                    console.print(f"workers on {database}: logs kept in {run['worker_logs']}")
    return results


def _keep_logs(home: Path, database: str) -> str:
    kept = Path(tempfile.mkdtemp(prefix=f"modulate-bench-{database}-logs-"))
    for log in home.glob("worker-*.log"):
        shutil.copy(log, kept)
    return str(kept)


async def _measure(
    fleet: Fleet, services: BenchServices, files: int, concurrent: int, latency_s: float
) -> dict[str, Any]:
    names = [f"{ORGANIZATION}-{i}" for i in range(RUNS)]
    for name in names:
        await fleet.save_run_blocks(
            services, name=name, bucket=BUCKET, organization=ORGANIZATION,
            concurrent=concurrent, api_key=f"key-{ORGANIZATION}",
        )
    services.reset_stats()
    limit_slots = limit_name(ORGANIZATION, MODEL)
    with (
        sample_in_flight(services.emulator_url, [ORGANIZATION], MODEL) as seen,
        _sample_over_leased(fleet.env["PREFECT_API_URL"], limit_slots,
                            services.emulator_url) as over,
    ):
        ids = [await fleet.run(blocks=name, prefix=PREFIX, files=files) for name in names]
        runs = await fleet.wait_final(ids, RUNS_TIMEOUT_S)
    stats = services.stats(ORGANIZATION, MODEL)
    limit = concurrent / latency_s
    first, last = seen.first(ORGANIZATION) or 0.0, seen.last(ORGANIZATION) or 0.0
    starts = [r.start_time.timestamp() for r in runs if r.start_time]
    ends = [r.end_time.timestamp() for r in runs if r.end_time]
    calls_s = max(last - first, 1e-9)
    flows_s = max(max(ends, default=0.0) - min(starts, default=0.0), 1e-9)
    return {
        "states": sorted({r.state.name if r.state else "None" for r in runs}),
        "completed": stats["completed"],
        "calls_window_s": round(calls_s, 2),
        "files_per_s": round(stats["completed"] / calls_s, 2),
        "of_limit": round(stats["completed"] / calls_s / limit, 3),
        "host_cpu_busy": round(seen.host_busy(first, last), 3),
        "flows_window_s": round(flows_s, 2),
        "of_limit_flows": round(stats["completed"] / flows_s / limit, 3),
        "max_in_flight": stats["max_in_flight"],
        "rejections": {k: v for k, v in stats["rejections"].items() if v},
        "over_leased_samples": f"{over.over} of {over.samples}",
        "slots_held_after": await fleet.active_slots(limit_slots),
    }


@dataclass
class OverLeased:
    """Samples in which the emulator had more calls in flight than the limit leased."""

    samples: int = 0
    over: int = 0


@contextlib.contextmanager
def _sample_over_leased(api_url: str, limit: str, emulator_url: str) -> Iterator[OverLeased]:
    """Every 50 ms: the limit's active slots, the emulator's in-flight count, the slots again.

    The two servers cannot be read at one instant. A call holds its slot from before it is
    sent until after its answer, so a call in flight at the emulator's read holds a slot at
    one of the two limit reads either side, unless its whole lease began and ended between
    them; comparing with the larger read leaves only that case, which 50 ms makes rare.
    """
    seen = OverLeased()

    def leased(client: httpx.Client) -> int:
        found = client.get(f"{api_url}/v2/concurrency_limits/{limit}")
        found.raise_for_status()
        return int(found.json()["active_slots"])

    def sample(client: httpx.Client) -> None:
        before = leased(client)
        stats = client.get(f"{emulator_url}/_emulator/stats").json()
        in_flight = stats["orgs"][ORGANIZATION][MODEL]["in_flight"]
        seen.samples += 1
        seen.over += in_flight > max(before, leased(client))

    with polling("bench-over-leased", sample):
        yield seen


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for database in DATABASES:
        run, c = results[database], results["concurrent"]
        rows += [
            (f"workers on {database}: files/s of C/L (first to last call)", run["of_limit"],
             f">= {MIN_OF_LIMIT}", run["of_limit"] >= MIN_OF_LIMIT),
            (f"workers on {database}: max in flight", run["max_in_flight"], f"<= {c}",
             run["max_in_flight"] <= c),
            (f"workers on {database}: calls refused for concurrency",
             run["rejections"].get("concurrency", 0), "0",
             not run["rejections"].get("concurrency", 0)),
            (f"workers on {database}: slots held afterwards", run["slots_held_after"], "0",
             run["slots_held_after"] == 0),
        ]
    return [{"target": t, "value": v, "mark": m, "pass": bool(ok)} for t, v, m, ok in rows]


def print_workers(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{results['runs']} runs of {results['files_per_run']} files on "
                  f"{results['workers']} process workers, one limit of C = "
                  f"{results['concurrent']}, L = {results['latency_s']} s")
    for column in ("database", "states", "completed", "files/s", "of C/L (calls)",
                   "of C/L (flow runs)", "host CPU busy (calls)", "max in flight",
                   "rejections", "in flight > leased", "slots held after"):
        table.add_column(column)
    for database in DATABASES:
        run = results[database]
        rejections = ", ".join(f"{k} {v}" for k, v in run["rejections"].items()) or "none"
        table.add_row(database, ", ".join(run["states"]), str(run["completed"]),
                      f"{run['files_per_s']:.2f}", f"{run['of_limit']:.3f}",
                      f"{run['of_limit_flows']:.3f}", f"{run['host_cpu_busy']:.2f}",
                      str(run["max_in_flight"]), rejections,
                      run["over_leased_samples"], str(run["slots_held_after"]))
    console.print(table)
