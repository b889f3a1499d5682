"""The benchmark's quick mode runs end to end and writes every field of its JSON.

The targets themselves are printed PASS/FAIL by the benchmark, not asserted here: CI
machines are too noisy for a throughput assertion to mean anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_FIELDS = {
    "files", "completed", "seconds", "files_per_s", "of_limit", "max_in_flight", "requests",
    "rejections", "cpu_seconds", "cpu_ms_per_file", "peak_rss_mb", "services_cpu_seconds",
    "host_cpu_busy",
}
MIXED_SIDE = {
    "completed", "seconds", "of_bound", "first_call_s", "last_call_s", "busy_first_to_last",
    "max_in_flight", "rejections", "cpu_ms_per_file", "host_cpu_busy_first_to_last",
}
TARGETS = 8 + 2 + 2  # the contenders', the mixed-length mode's, the evidence mode's


# About 1.5 min on a quiet machine; a fresh Prefect server alone took 94 s on loaded cores.
@pytest.mark.timeout(600)
def test_quick_bench_writes_the_json(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert {
        "machine", "params", "contenders", "ratios", "rss_growth_mb", "targets", "mixed",
        "evidence",
    } <= set(results)
    assert set(results["contenders"]) == {
        "ours-small", "ours", "plain-small", "plain", "floor", "naive"
    }
    for name, run in results["contenders"].items():
        assert RUN_FIELDS <= set(run), name
        assert run["completed"] == run["files"] > 0, name  # every contender did its files
    assert set(results["ratios"]) == {
        "ours_of_limit", "ours_small_of_limit", "ours_vs_plain", "ours_small_vs_plain_small",
        "ours_vs_naive", "ours_cpu_over_floor",
    }
    small, full = results["params"]["small_files"], results["params"]["files"]
    assert results["contenders"]["plain-small"]["files"] == small < full  # both sizes
    assert results["contenders"]["floor"]["files"] == full
    mixed = results["mixed"]
    assert mixed["lower_bound_s"] > 0
    for side in ("ours", "plain"):
        assert MIXED_SIDE <= set(mixed[side]), side
        assert mixed[side]["completed"] == mixed["files"] > 0, side
        assert mixed[side]["max_in_flight"] <= results["params"]["concurrent"], side
    evidence = results["evidence"]  # the block says 10, the service takes 4
    assert evidence["completed"] == evidence["files"] > 0
    assert evidence["max_in_flight"] <= evidence["service_limit"]
    assert len(results["targets"]) == TARGETS
    assert all({"target", "value", "mark", "pass"} <= set(t) for t in results["targets"])
    assert "PASS" in done.stdout or "FAIL" in done.stdout
