"""The benchmark's outside world: the emulator and moto S3, each in a process of its own.

Running them as subprocesses keeps their CPU and memory out of the numbers measured for
the bench process, which holds only the contender being measured (and Prefect's client).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from emulator import EmulatorConfig, ModelLimits, OrgConfig
from modulate_flows.local import LocalServices
from modulate_flows.samples import speech_wav

__all__ = [
    "BenchServices", "InFlight", "bench_files", "busy_share", "host_cpu_ticks", "polling",
    "sample_in_flight", "start_services", "upload",
]

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
UPLOAD_THREADS = 16
SAMPLE_S = 0.05
MODELS = ("stt", "vfast")  # the flow's model, and the one the deployed runs use (bench/fleet.py)
BASE_WAVS = 16  # distinct one-second sounds; every file then differs by its last samples


@dataclass
class BenchServices:
    """Where the subprocess emulator and moto listen, and how to reach them."""

    local: LocalServices
    emulator_url: str
    pids: dict[str, int] = field(default_factory=dict)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each service process (to see which one is the bottleneck)."""
        ticks = os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {}
        for name, pid in self.pids.items():
            with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            used[name] = (int(fields[11]) + int(fields[12])) / ticks
        return used

    def stats(self, org: str, model: str = "stt") -> dict[str, Any]:
        response = httpx.get(f"{self.emulator_url}/_emulator/stats", timeout=30)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()["orgs"][org][model]
        return stats

    def stats_all(self, orgs: list[str], model: str = "stt") -> dict[str, dict[str, Any]]:
        response = httpx.get(f"{self.emulator_url}/_emulator/stats", timeout=30)
        response.raise_for_status()
        found = response.json()["orgs"]
        return {org: found[org][model] for org in orgs}

    def reset_stats(self) -> None:
        httpx.post(f"{self.emulator_url}/_emulator/stats/reset", timeout=30).raise_for_status()

    def set_latency(self, seconds: float, *, per_audio_s: float = 0.0) -> None:
        """Every call holds its slot `seconds`, plus `per_audio_s` per second of its audio."""
        httpx.patch(
            f"{self.emulator_url}/_emulator/config",
            json={"latency": {"mean_s": seconds, "jitter_s": 0.0, "per_audio_s": per_audio_s}},
            timeout=30,
        ).raise_for_status()


def host_cpu_ticks() -> tuple[int, int]:
    """The whole machine's CPU ticks since boot, (busy, all), from /proc/stat.

    Every process counts, ours, the services' and anyone else's: a share near 1.0 over a
    window says its figures were bound by the machine's cores, not by the limit.
    """
    with open("/proc/stat", encoding="ascii") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait; the rest (user ... steal) is busy
    return sum(ticks) - idle, sum(ticks)


def busy_share(start: tuple[int, int], end: tuple[int, int]) -> float:
    """The share of the machine's CPU time that was busy between two `host_cpu_ticks()`."""
    return (end[0] - start[0]) / max(end[1] - start[1], 1)


@dataclass
class InFlight:
    """The emulator's calls in flight per org, sampled: (seconds since the start, counts),
    and the machine's CPU ticks at each sample."""

    samples: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    ticks: list[tuple[float, tuple[int, int]]] = field(default_factory=list)
    wall_start: float = field(default_factory=time.time)  # the start, on the wall clock

    def latest(self, org: str) -> int:
        return self.samples[-1][1].get(org, 0) if self.samples else 0

    def first(self, org: str, at_least: int = 1, after: float = 0.0) -> float | None:
        """When `org` first had `at_least` calls in flight (at or after `after`), if ever."""
        return next(
            (t for t, seen in self.samples if t >= after and seen.get(org, 0) >= at_least), None
        )

    def last(self, org: str) -> float | None:
        """The last sample with a call of `org` in flight."""
        return next((t for t, seen in reversed(self.samples) if seen.get(org, 0)), None)

    def mean_total(self, start: float, end: float) -> float:
        """Mean of all orgs' calls in flight together over the samples in [start, end]."""
        window = [sum(seen.values()) for t, seen in self.samples if start <= t <= end]
        return sum(window) / len(window) if window else 0.0

    def max_total(self) -> int:
        return max((sum(seen.values()) for _, seen in self.samples), default=0)

    def host_busy(self, start: float, end: float) -> float:
        """The share of the machine's CPU time busy between the samples in [start, end]."""
        window = [ticks for t, ticks in self.ticks if start <= t <= end]
        return busy_share(window[0], window[-1]) if len(window) > 1 else 0.0


@contextlib.contextmanager
def polling(name: str, sample: Callable[[httpx.Client], None]) -> Iterator[None]:
    """Call `sample` every 50 ms in a thread of its own meanwhile, with one HTTP client."""
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                sample(client)
                stop.wait(SAMPLE_S)

    sampler = threading.Thread(target=poll, name=name, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join(timeout=30)


@contextlib.contextmanager
def sample_in_flight(
    emulator_url: str, orgs: list[str], model: str = "stt"
) -> Iterator[InFlight]:
    """Poll the emulator's in-flight counts of `orgs` every 50 ms in a thread meanwhile.

    A sample is one snapshot of the emulator's event loop, so the orgs' counts in it are
    simultaneous; between samples a brief peak can go unseen (the emulator's own
    `max_in_flight` per org catches those).
    """
    started = time.monotonic()
    seen = InFlight()

    def sample(client: httpx.Client) -> None:
        orgs_stats = client.get(f"{emulator_url}/_emulator/stats").json()["orgs"]
        counts = {org: orgs_stats[org][model]["in_flight"] for org in orgs}
        at = time.monotonic() - started
        seen.samples.append((at, counts))
        seen.ticks.append((at, host_cpu_ticks()))

    with polling("bench-in-flight", sample):
        yield seen


def bench_files(n: int, prefix: str = "bench/") -> Iterator[tuple[str, bytes]]:
    """`n` distinct one-second WAVs, made cheaply from a few synthesised ones.

    Synthesising 5,000 sounds in pure Python takes minutes; a handful of bases with the
    file's index written into the last samples gives distinct bytes (and transcripts).
    """
    bases = [speech_wav(1.0, seed=i) for i in range(BASE_WAVS)]
    for i in range(n):
        base = bases[i % BASE_WAVS]
        yield f"{prefix}call-{i:05d}.wav", base[:-8] + i.to_bytes(8, "little")


@contextlib.contextmanager
def start_services(orgs: list[str], concurrent: int) -> Iterator[BenchServices]:
    """Start the emulator (orgs with `concurrent` slots of each model in MODELS, key
    "key-<org>") and moto.

    The emulator trusts each WAV header's duration (bench/mixed.py sends sparse WAVs; the
    other files are whole, so for them it changes nothing).
    """
    config = EmulatorConfig(
        wav_duration_from_header=True,
        orgs=[
            OrgConfig(
                name=org,
                velma_keys=[f"key-{org}"],
                models={
                    model: ModelLimits(concurrent=concurrent, monthly_audio_hours=1e6)
                    for model in MODELS
                },
            )
            for org in orgs
        ]
    )
    with tempfile.TemporaryDirectory(prefix="modulate-bench-") as tmp:
        config_path = Path(tmp) / "emulator.json"
        config_path.write_text(json.dumps(config.model_dump(mode="json")), encoding="utf-8")
        emulator_port, moto_port = _free_port(), _free_port()
        commands = [
            [sys.executable, "-m", "emulator", "--port", str(emulator_port),
             "--config", str(config_path), "--log-level", "warning"],
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(moto_port)],
        ]
        with contextlib.ExitStack() as stack:
            pids = {
                name: stack.enter_context(_process(command)).pid
                for name, command in zip(("emulator", "moto"), commands, strict=True)
            }
            emulator_url = f"http://{HOST}:{emulator_port}"
            s3_endpoint = f"http://{HOST}:{moto_port}"
            _wait_http(f"{emulator_url}/_emulator/stats")
            _wait_http(s3_endpoint)
            local = LocalServices(
                s3_endpoint=s3_endpoint, emulator=SimpleNamespace(url=emulator_url)
            )
            yield BenchServices(local=local, emulator_url=emulator_url, pids=pids)


def upload(services: BenchServices, bucket: str, files: Iterator[tuple[str, bytes]]) -> int:
    """Put every file into `bucket` (created) with a few threads; returns how many."""
    client = services.local.s3_client()
    services.local.upload(bucket, {})
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        done = list(
            pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), files)
        )
    return len(done)


@contextlib.contextmanager
def _process(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up in {STARTUP_TIMEOUT_S:.0f} s") from None
            time.sleep(0.1)  # polling a port that is not open yet: nothing to wait on instead
