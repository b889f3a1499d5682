"""Mixed-length audio: call recordings of skewed lengths, each call as slow as it is long.

The corpus is lognormal around a median of 3 minutes with a few hour-long calls, in
listing order as their keys sort (seeded, so every run sends the same corpus). The files
are small: each WAV's header declares its full duration and its body is 16 bytes per
second of that duration (so object size still grows with duration, as one codec's does),
and the emulator, told to trust the header (`wav_duration_from_header`), bills and times
each call as the duration it declares. A call holds its slot for
`LATENCY_BASE_S + LATENCY_PER_AUDIO_S * seconds`.

No client can finish before max(sum of latencies / C, longest latency): the slots are
never more than full, and the longest call alone takes its latency. Ours (largest first
within a look-ahead, tasks/ordering.py) and the plain script (listing order) run on the
same files; each is reported as its wall time over that bound.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import contenders
from bench.services import BenchServices, InFlight, sample_in_flight, upload
from emulator.audio import declared_wav
from modulate_flows.samples import speech_wav

__all__ = [
    "MIXED_ORGS", "latencies", "lower_bound_s", "mixed_files", "print_mixed", "run_mixed",
    "targets",
]

MIXED_FILES = 1000
QUICK_MIXED_FILES = 40
MEDIAN_S = 180.0
SIGMA = 1.0  # lognormal: a quarter of the calls under 1.5 min, one in twenty over 15 min
MIN_S = 15.0
LONG_S = 3600.0
LONG_SHARE = 0.005  # "a few of 60 minutes": five in a thousand
SEED = 0
BODY_BYTES_PER_S = 16
LATENCY_BASE_S = 0.05
LATENCY_PER_AUDIO_S = 0.004  # 3 min -> 0.77 s, 60 min -> 14.45 s
MAX_OF_BOUND = 1.1
PREFIX = "mixed/"
MIXED_ORGS = ["mixed-ours", "mixed-plain"]


def durations(n: int, seed: int = SEED) -> list[float]:
    """Seconds of each call, in listing order."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        long = rng.random() < LONG_SHARE
        drawn = rng.lognormvariate(math.log(MEDIAN_S), SIGMA)
        out.append(LONG_S if long else min(LONG_S, max(MIN_S, drawn)))
    return out


def latencies(seconds: list[float]) -> list[float]:
    """The emulator's latency of each call (no jitter in this mode)."""
    return [LATENCY_BASE_S + LATENCY_PER_AUDIO_S * s for s in seconds]


def lower_bound_s(latency: list[float], concurrent: int) -> float:
    """No client finishes sooner: the slots are at most full, the longest call is serial."""
    return max(sum(latency) / concurrent, max(latency, default=0.0))


def mixed_files(seconds: list[float], prefix: str = PREFIX) -> Iterator[tuple[str, bytes]]:
    """A small WAV per call that declares its duration; its index makes each one distinct."""
    base = speech_wav(4.0, seed=99)[44:]  # 128 KB of sound, longer than any body
    for i, duration in enumerate(seconds):
        body = base[: max(64, int(duration * BODY_BYTES_PER_S)) - 8] + i.to_bytes(8, "little")
        yield f"{prefix}call-{i:05d}.wav", declared_wav(duration, body)


async def run_mixed(
    services: BenchServices, *, bucket: str, files: int, concurrent: int, output_root: str,
    console: Console,
) -> dict[str, Any]:
    """Upload the corpus, run ours then the plain script on it; wall times against the bound."""
    seconds = durations(files)
    latency = latencies(seconds)
    bound = lower_bound_s(latency, concurrent)
    keys = [f"{PREFIX}call-{i:05d}.wav" for i in range(files)]  # mixed_files() names
    upload(services, bucket, mixed_files(seconds))
    services.set_latency(LATENCY_BASE_S, per_audio_s=LATENCY_PER_AUDIO_S)
    ours_org, plain_org = MIXED_ORGS
    await contenders.prepare_ours(
        services, org=ours_org, bucket=bucket, output_root=output_root, concurrent=concurrent
    )
    console.print(f"mixed: ours on {files} calls of mixed length (bound {bound:.1f} s)")
    services.reset_stats()
    with (sample_in_flight(services.emulator_url, [ours_org]) as ours_seen,
          contenders.measure(services) as ours):
        summary = await contenders.run_ours(org=ours_org, prefix=PREFIX, files=files)
    ours_stats = services.stats(ours_org)
    console.print(f"mixed: plain script on the same {files} calls, listing order")
    services.reset_stats()
    with (sample_in_flight(services.emulator_url, [plain_org]) as plain_seen,
          contenders.measure(services) as plain):
        plain_done = await contenders.run_plain(
            services, org=plain_org, bucket=bucket, keys=keys, concurrent=concurrent
        )
    plain_stats = services.stats(plain_org)
    return {
        "files": files,
        "audio_hours": round(sum(seconds) / 3600, 2),
        "median_s": MEDIAN_S,
        "longest_s": max(seconds),
        "hour_long_calls": sum(s >= LONG_S for s in seconds),
        "latency": f"{LATENCY_BASE_S} s + {LATENCY_PER_AUDIO_S} s per audio second",
        "sum_latency_s": round(sum(latency), 2),
        "longest_latency_s": round(max(latency), 2),
        "lower_bound_s": round(bound, 2),
        "ours": _side(
            ours, summary.files.get("completed", 0), ours_stats, bound, files, ours_seen,
            ours_org, concurrent,
        ),
        "plain": _side(
            plain, plain_done, plain_stats, bound, files, plain_seen, plain_org, concurrent
        ),
        "ours_vs_plain": round(plain.seconds / max(ours.seconds, 1e-9), 3),
    }


def _side(
    measured: contenders.Measured, completed: int, stats: dict[str, Any], bound: float,
    files: int, seen: InFlight, org: str, concurrent: int,
) -> dict[str, Any]:
    first, last = seen.first(org) or 0.0, seen.last(org) or 0.0
    return {
        # Where the time over the bound goes: before the first call, slots idle between
        # the first and the last call, after the last one (Parquet compaction, the end).
        "first_call_s": round(first, 2),
        "last_call_s": round(last, 2),
        "busy_first_to_last": round(seen.mean_total(first, last) / concurrent, 3),
        "host_cpu_busy_first_to_last": round(seen.host_busy(first, last), 3),
        "completed": completed,
        "seconds": round(measured.seconds, 2),
        "of_bound": round(measured.seconds / bound, 3),
        "max_in_flight": stats["max_in_flight"],
        "rejections": {k: v for k, v in stats["rejections"].items() if v},
        "cpu_ms_per_file": round(1000 * measured.cpu_seconds / max(files, 1), 3),
    }


def targets(mixed: dict[str, Any]) -> list[dict[str, Any]]:
    ours = mixed["ours"]
    rows = [
        ("mixed: ours wall time / lower bound", ours["of_bound"], f"<= {MAX_OF_BOUND}",
         ours["of_bound"] <= MAX_OF_BOUND),
        ("mixed: ours vs plain (wall time ratio)", mixed["ours_vs_plain"], "> 1.0x",
         mixed["ours_vs_plain"] > 1.0),
    ]
    return [{"target": t, "value": v, "mark": m, "pass": bool(ok)} for t, v, m, ok in rows]


def print_mixed(mixed: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"Mixed lengths: {mixed['files']} calls, {mixed['audio_hours']} h of audio, "
        f"{mixed['hour_long_calls']} of 60 min; latency {mixed['latency']}; lower bound "
        f"max({mixed['sum_latency_s']:.0f} s / C, {mixed['longest_latency_s']:.1f} s) = "
        f"{mixed['lower_bound_s']:.1f} s"
    )
    for column in ("contender", "completed", "wall s", "of bound", "first call s",
                   "last call s", "busy first-last", "host CPU busy", "max in flight",
                   "rejections", "CPU ms/file"):
        table.add_column(column, justify="left" if column in ("contender", "rejections")
                         else "right")
    for name in ("ours", "plain"):
        side = mixed[name]
        rejections = ", ".join(f"{k} {v}" for k, v in side["rejections"].items()) or "none"
        table.add_row(name, str(side["completed"]), f"{side['seconds']:.1f}",
                      f"{side['of_bound']:.3f}", f"{side['first_call_s']:.1f}",
                      f"{side['last_call_s']:.1f}", f"{side['busy_first_to_last']:.3f}",
                      f"{side['host_cpu_busy_first_to_last']:.2f}",
                      str(side["max_in_flight"]), rejections,
                      f"{side['cpu_ms_per_file']:.2f}")
    console.print(table)
