"""A limits block above the service's limit (issue 11, "Adapt the gate to the service").

The limits block says 10 for stt, the emulator's org takes 4 at once, and it answers every
refusal with the 2026 detail "Insufficient credits." (the same text as an exhausted month).
Our flow must learn the 4 from the refusals, not defer the month: every file completed,
none deferred or failed, and at least 0.85 of 4/L files/s from the first call to the last.
"""

from __future__ import annotations

from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench import contenders
from bench.services import BenchServices, bench_files, sample_in_flight, upload

__all__ = ["EVIDENCE_ORGS", "print_evidence", "run_evidence", "targets"]

EVIDENCE_ORGS = ["evidence-ours"]
DECLARED = 10
SERVICE = 4
FILES = 300
QUICK_FILES = 40
PREFIX = "evidence/"
MIN_OF_LIMIT = 0.85


async def run_evidence(
    services: BenchServices, *, bucket: str, files: int, latency_s: float, output_root: str,
    console: Console,
) -> dict[str, Any]:
    """Run ours with the block at DECLARED against a service at SERVICE; see the docstring."""
    (org,) = EVIDENCE_ORGS
    upload(services, bucket, bench_files(files, PREFIX))
    await contenders.prepare_ours(
        services, org=org, bucket=bucket, output_root=output_root, concurrent=DECLARED
    )
    _patch(services, f"/_emulator/orgs/{org}/models/stt", {"concurrent": SERVICE})
    _patch(services, "/_emulator/config", {"detail_family": "2026"})
    services.set_latency(latency_s)
    console.print(f"evidence: ours on {files} files, block says {DECLARED}, service takes "
                  f"{SERVICE}, every refusal 'Insufficient credits.'")
    services.reset_stats()
    with (sample_in_flight(services.emulator_url, [org]) as seen,
          contenders.measure(services) as measured):
        summary = await contenders.run_ours(org=org, prefix=PREFIX, files=files)
    stats = services.stats(org)
    first, last = seen.first(org) or 0.0, seen.last(org) or 0.0
    ideal = SERVICE / latency_s
    completed = summary.files.get("completed", 0)
    return {
        "files": files,
        "declared": DECLARED,
        "service_limit": SERVICE,
        "latency_s": latency_s,
        "statuses": summary.files,
        "completed": completed,
        "first_to_last_call_s": round(last - first, 2),
        "of_service_limit": round(completed / max(last - first, 1e-9) / ideal, 3),
        "wall_s": round(measured.seconds, 2),
        "wall_of_service_limit": round(completed / measured.seconds / ideal, 3),
        "max_in_flight": stats["max_in_flight"],
        "rejections": {k: v for k, v in stats["rejections"].items() if v},
    }


def _patch(services: BenchServices, path: str, body: dict[str, Any]) -> None:
    httpx.patch(f"{services.emulator_url}{path}", json=body, timeout=30).raise_for_status()


def targets(run: dict[str, Any]) -> list[dict[str, Any]]:
    others = {k: v for k, v in run["statuses"].items() if k != "completed"}
    rows = [
        ("evidence: every file completed (block 10, service 4)",
         f"{run['completed']} of {run['files']}" + (f", {others}" if others else ""),
         f"{run['files']} of {run['files']}", run["completed"] == run["files"]),
        ("evidence: files/s of 4/L, first to last call", run["of_service_limit"],
         f">= {MIN_OF_LIMIT}", run["of_service_limit"] >= MIN_OF_LIMIT),
    ]
    return [{"target": t, "value": v, "mark": m, "pass": bool(ok)} for t, v, m, ok in rows]


def print_evidence(run: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Block above the service: block {run['declared']}, service "
                  f"{run['service_limit']}, L = {run['latency_s']} s, every refusal "
                  "'Insufficient credits.'")
    for column in ("files", "statuses", "first to last call s", "of 4/L", "wall s",
                   "wall of 4/L", "max in flight", "rejections"):
        table.add_column(column)
    table.add_row(str(run["files"]), str(run["statuses"]), f"{run['first_to_last_call_s']:.1f}",
                  f"{run['of_service_limit']:.3f}", f"{run['wall_s']:.1f}",
                  f"{run['wall_of_service_limit']:.3f}", str(run["max_in_flight"]),
                  str(run["rejections"]))
    console.print(table)
