"""Run every contender on the same files and report (the body of `python -m bench`).

Order matters for memory: our flow runs first at the small size, then at the full
size, before the baselines allocate anything, so its RSS growth is its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.testing.utilities import prefect_test_harness
from rich.console import Console

from bench import contenders, evidence, mixed, report, shared, workers
from bench.services import BenchServices, bench_files, start_services, upload

__all__ = ["DEFAULT_FILES", "QUICK", "run_bench"]

DEFAULT_FILES = 5_000
DEFAULT_NAIVE_FILES = 300
CONCURRENT = 25
LATENCY_S = 0.5
SMALL_FILES = 1_000
QUICK = {"files": 200, "naive_files": 25}
BUCKET = "bench-audio"
PREFIX = "bench/"
RESULTS = Path(__file__).parent / "results" / "latest.json"
ORGS = ["ours-small", "ours", "plain-small", "plain", "floor", "naive"]


def run_bench(
    *,
    files: int = DEFAULT_FILES,
    naive_files: int = DEFAULT_NAIVE_FILES,
    chunk_size: int | None = None,
    output: Path = RESULTS,
    console: Console | None = None,
    only: frozenset[str] = frozenset(ORGS),
    profile: Path | None = None,
    mixed_files: int = mixed.MIXED_FILES,
    quick: bool = False,
    evidence_files: int = evidence.FILES,
) -> dict[str, Any]:
    """Run the contenders and modes in `only`, write the JSON, print the tables.

    Contenders and the "mixed" and "evidence" modes share one set of services and a Prefect
    test server;
    "shared" and "workers" start servers and workers of their own. `only` picks (to iterate
    on one; the contenders' targets need all four); `profile` cProfiles our flow's runs
    into `<profile>-<contender>.prof`; `quick` shrinks "shared" and "workers" too.
    """
    console = console or Console(width=150)
    # boto3 keeps 10 connections per client; the baselines read with more threads than that.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    naive_files = min(naive_files, files)
    small = min(SMALL_FILES, max(1, files // 5))
    runs: dict[str, dict[str, Any]] = {}
    in_harness: dict[str, dict[str, Any]] = {}
    if only & {*ORGS, "mixed", "evidence"}:
        runs, in_harness = _in_harness(
            files, small, naive_files, chunk_size, console, only, profile, mixed_files,
            evidence_files,
        )
    results = _results(runs, files, small, naive_files, chunk_size)
    if "mixed" in in_harness:
        results["mixed"] = in_harness["mixed"]
        results["targets"] += mixed.targets(results["mixed"])
    if "evidence" in in_harness:
        results["evidence"] = in_harness["evidence"]
        results["targets"] += evidence.targets(results["evidence"])
    if "shared" in only:
        results["shared"] = shared.run_shared(concurrent=CONCURRENT, console=console, quick=quick)
        results["targets"] += shared.targets(results["shared"])
    if "workers" in only:
        results["workers"] = workers.run_workers(
            concurrent=CONCURRENT, latency_s=LATENCY_S, console=console, quick=quick
        )
        results["targets"] += workers.targets(results["workers"])
    report.write_json(results, output)
    if runs:
        report.print_runs(results, console)
    if "mixed" in results:
        mixed.print_mixed(results["mixed"], console)
    if "evidence" in results:
        evidence.print_evidence(results["evidence"], console)
    if "shared" in results:
        shared.print_shared(results["shared"], console)
    if "workers" in results:
        workers.print_workers(results["workers"], console)
    report.print_targets(results["targets"], console)
    console.print(f"JSON: {output}")
    return results


def _in_harness(
    files: int, small: int, naive_files: int, chunk_size: int | None, console: Console,
    only: frozenset[str], profile: Path | None, mixed_files: int, evidence_files: int,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The contenders, the mixed and the evidence modes: one emulator, one moto, one Prefect
    test server. Returns the contenders' runs and the modes' results by name."""
    modes: dict[str, dict[str, Any]] = {}
    orgs = ORGS + mixed.MIXED_ORGS + evidence.EVIDENCE_ORGS
    with start_services(orgs, CONCURRENT) as services:
        if only & set(ORGS):
            console.print(f"Uploading {files} files to moto ({services.local.s3_endpoint})")
            upload(services, BUCKET, bench_files(files, PREFIX))
        services.set_latency(LATENCY_S)
        console.print("Starting a Prefect test server")
        with prefect_test_harness(server_startup_timeout=300):
            runs = asyncio.run(_run_all(
                services, files, small, naive_files, chunk_size, console, only, profile
            ))
            if "mixed" in only:
                with tempfile.TemporaryDirectory(prefix="modulate-bench-mixed-") as out:
                    modes["mixed"] = asyncio.run(mixed.run_mixed(
                        services, bucket=BUCKET, files=mixed_files, concurrent=CONCURRENT,
                        output_root=out, console=console,
                    ))
            if "evidence" in only:  # last: it switches the emulator's detail family
                with tempfile.TemporaryDirectory(prefix="modulate-bench-evidence-") as out:
                    modes["evidence"] = asyncio.run(evidence.run_evidence(
                        services, bucket=BUCKET, files=evidence_files, latency_s=LATENCY_S,
                        output_root=out, console=console,
                    ))
    return runs, modes


async def _run_all(
    services: BenchServices,
    files: int,
    small: int,
    naive_files: int,
    chunk_size: int | None,
    console: Console,
    only: frozenset[str],
    profile: Path | None,
) -> dict[str, dict[str, Any]]:
    keys = [key for key, _ in _keys(files)]
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="modulate-bench-out-") as out:
        for org, n in (("ours-small", small), ("ours", files)):
            if org not in only:
                continue
            console.print(f"ours: transcribe flow on {n} files")
            await contenders.prepare_ours(
                services, org=org, bucket=BUCKET, output_root=f"{out}/{org}",
                concurrent=CONCURRENT,
            )
            services.reset_stats()
            with contenders.measure(services) as measured, _profiled(profile, org):
                summary = await contenders.run_ours(
                    org=org, prefix=PREFIX, files=n, chunk_size=chunk_size
                )
            runs[org] = _run(services, org, n, summary.files.get("completed", 0), measured)
    baselines = (
        ("plain-small", small, contenders.run_plain, "vendor-docs script"),
        ("plain", files, contenders.run_plain, "vendor-docs script"),
        ("floor", files, contenders.run_floor, "one GET and one POST per file"),
    )
    for org, n, run_baseline, what in baselines:
        if org not in only:
            continue
        console.print(f"{org}: {what} on {n} files")
        services.reset_stats()
        with contenders.measure(services) as measured:
            done = await run_baseline(
                services, org=org, bucket=BUCKET, keys=keys[:n], concurrent=CONCURRENT
            )
        runs[org] = _run(services, org, n, done, measured)
    if "naive" not in only:
        return runs
    console.print(f"naive: one Prefect task per file on the first {naive_files} files")
    services.reset_stats()
    with contenders.measure(services) as measured:
        done = await contenders.run_naive(
            services, org="naive", bucket=BUCKET, keys=keys[:naive_files], concurrent=CONCURRENT
        )
    runs["naive"] = _run(services, "naive", naive_files, done, measured)
    return runs


@contextlib.contextmanager
def _profiled(path: Path | None, org: str) -> Iterator[None]:
    """cProfile the block into `<path>-<org>.prof` (nothing when path is None).

    Timed by the thread's CPU clock, not the wall clock: on a loaded machine a send() that
    wakes the emulator's process lost the core for ms at a time, and the wall-clock profile
    charged that to the send (7.7 s of 60). The S3 reads' threads are not in it.
    """
    if path is None:
        yield
        return
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        profiler.dump_stats(f"{path}-{org}.prof")


def _keys(files: int) -> list[tuple[str, None]]:
    # The same names bench_files() uploads, without making the audio again.
    return [(f"{PREFIX}call-{i:05d}.wav", None) for i in range(files)]


def _run(
    services: BenchServices, org: str, files: int, completed: int, measured: contenders.Measured
) -> dict[str, Any]:
    stats = services.stats(org)
    files_per_s = completed / measured.seconds if measured.seconds else 0.0
    return {
        "files": files,
        "completed": completed,
        "seconds": round(measured.seconds, 2),
        "files_per_s": round(files_per_s, 3),
        "of_limit": round(files_per_s / (CONCURRENT / LATENCY_S), 4),
        "max_in_flight": stats["max_in_flight"],
        "requests": stats["requests"],
        "rejections": {k: v for k, v in stats["rejections"].items() if v},
        "cpu_seconds": round(measured.cpu_seconds, 3),
        "cpu_ms_per_file": round(1000 * measured.cpu_seconds / max(files, 1), 3),
        "peak_rss_mb": round(measured.peak_rss_mb, 1),
        "services_cpu_seconds": measured.services_cpu_seconds,
        "host_cpu_busy": round(measured.host_busy, 3),
    }


def _results(
    runs: dict[str, dict[str, Any]], files: int, small: int, naive_files: int,
    chunk_size: int | None,
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": report.machine(),
        "params": {
            "files": files,
            "small_files": small,
            "naive_files": naive_files,
            "concurrent": CONCURRENT,
            "latency_s": LATENCY_S,
            "limit_files_per_s": CONCURRENT / LATENCY_S,
            "chunk_size": chunk_size,
            "services": "emulator and moto in subprocesses; CPU and RSS are the bench "
            "process's own (our flow, or the baseline, plus the Prefect client)",
        },
        "contenders": runs,
    }
    if set(runs) != set(ORGS):  # a partial run (--only): its rows, no ratios or targets
        results["targets"] = []
        return results
    ours, ours_small = runs["ours"], runs["ours-small"]

    def over(run: dict[str, Any], than: str, figure: str = "files_per_s") -> float:
        return round(run[figure] / max(runs[than][figure], 1e-9), 3)

    results["ratios"] = {
        "ours_of_limit": ours["of_limit"],
        "ours_small_of_limit": ours_small["of_limit"],
        "ours_vs_plain": over(ours, "plain"),
        "ours_small_vs_plain_small": over(ours_small, "plain-small"),
        "ours_vs_naive": over(ours, "naive"),
        "ours_cpu_over_floor": over(ours, "floor", "cpu_ms_per_file"),
    }
    results["rss_growth_mb"] = round(ours["peak_rss_mb"] - ours_small["peak_rss_mb"], 1)
    results["targets"] = report.targets(results)
    return results
