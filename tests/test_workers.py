"""Deployed runs on two real process workers hold the org's limit, and a killed run frees it.

Everything is a real process: a `prefect server start`, `prefect deploy` of
deployments/prefect.yaml, two `prefect worker start` and the flow-run subprocesses
they spawn; moto and the emulator serve them on 127.0.0.1 from this process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_aws import S3Bucket

from blocks import ModelLimit, OrgLimits
from emulator import EmulatorConfig, ModelLimits, OrgConfig
from modulate_flows.local import LocalServices, local_services, save_blocks
from modulate_flows.samples import speech_wav
from tasks.slots import limit_name
from tests.prefect_server import (
    POOL,
    PREFECT_FILE,
    prefect_cli,
    running_server,
    start_prefect,
    stop,
    wait_ok,
)

ORG = "workers"
LIMIT = 3
BUCKET = "inbox"
WORKERS = 2
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Server-side: expired leases are swept every second (15 s by default), so the time a dead
# run's slots stay held is the lease itself. Workers poll the pool every second (15 s).
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}

T = TypeVar("T")


def api(base: str, method: str, path: str, **kw: Any) -> Any:
    """One Prefect API call, retried on 503 as Prefect's own client does.

    The server answers 503 to errors a client may retry, such as SQLite being busy with
    the workers' and flow runs' writes.
    """
    deadline = time.monotonic() + 30
    while True:
        response = httpx.request(method, f"{base}{path}", timeout=30, **kw)
        if response.status_code != 503 or time.monotonic() > deadline:
            response.raise_for_status()
            return response.json()
        time.sleep(0.5)  # back off before the retry, as the Prefect client does


@dataclass
class Stack:
    """The server's client environment, the local services and the deployment ids by name."""

    env: dict[str, str]
    services: LocalServices
    deployments: dict[str, str]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def api(self) -> str:
        return self.env["PREFECT_API_URL"]

    def emulator(self, method: str, path: str, **kw: Any) -> Any:
        response = httpx.request(method, f"{self.services.emulator_url}/_emulator{path}", **kw)
        response.raise_for_status()
        return response.json() if response.content else None

    def stats(self, model: str) -> dict[str, Any]:
        return self.emulator("GET", "/stats")["orgs"][ORG][model]

    def active_slots(self, model: str) -> int:
        found = api(self.api, "GET", f"/v2/concurrency_limits/{limit_name(ORG, model)}")
        return int(found["active_slots"])

    def run(self, deployment: str, prefix: str) -> str:
        """Create a flow run of a deployment over one prefix (what `run_deployment` does)."""
        source = {"bucket_block": "audio-inbox", "prefix": prefix, "pattern": "*"}
        created = api(
            self.api,
            "POST",
            f"/deployments/{self.deployments[deployment]}/create_flow_run",
            json={"parameters": {"source": source}},
        )
        return str(created["id"])

    def flow_runs(self, ids: list[str]) -> list[dict[str, Any]]:
        return api(self.api, "POST", "/flow_runs/filter", json={"flow_runs": {"id": {"any_": ids}}})


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)  # the poll interval of a condition, not a wait for an event
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def flow_run_pids(flow_run_id: str) -> list[int]:
    """The processes running one flow run: workers pass its id as PREFECT__FLOW_RUN_ID."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue  # gone meanwhile, or not ours
    return pids


async def _save_blocks(services: LocalServices, output: Path) -> None:
    limits = {"stt": ModelLimit(concurrent=LIMIT), "vfast": ModelLimit(concurrent=LIMIT)}
    await save_blocks(
        services,
        name="modulate",
        bucket=BUCKET,
        output_root=str(output),
        organization=ORG,
        api_key=f"key-{ORG}",
        limits=limits,
    )
    # The deployments read the audio through the "audio-inbox" bucket block.
    bucket = S3Bucket(bucket_name=BUCKET, credentials=services.aws_credentials())
    await bucket.asave("audio-inbox", overwrite=True)
    await (await OrgLimits.aload("modulate")).sync()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("prefect-home")
    output = tmp_path_factory.mktemp("out")
    models = {"stt": ModelLimits(concurrent=LIMIT), "vfast": ModelLimits(concurrent=LIMIT)}
    config = EmulatorConfig(orgs=[OrgConfig(name=ORG, velma_keys=[f"key-{ORG}"], models=models)])
    config.latency.mean_s = 0.1
    started = time.monotonic()
    with running_server(home, SERVER_SETTINGS) as env, local_services(config) as services:
        server_up = time.monotonic()
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        # nightly (stt) runs one at a time by design; english-fast (vfast) has no such
        # guard, so three of its runs can share the org's limit at once.
        deploy_log = home / "deploy.log"
        deploy = start_prefect(
            env,
            *("--no-prompt", "deploy", "--name", "nightly", "--name", "english-fast"),
            *("--prefect-file", str(PREFECT_FILE)),
            log=deploy_log,
        )
        workers = [
            start_prefect(
                env,
                *("worker", "start", "--pool", POOL, "--name", f"worker-{i}"),
                log=home / f"worker-{i}.log",
            )
            for i in range(WORKERS)
        ]
        try:
            # Prefect reads its settings per context: these blocks go to the subprocess server.
            with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
                asyncio.run(_save_blocks(services, output))
            services.upload(BUCKET, {})
            wait_ok(deploy, deploy_log)
            found = api(env["PREFECT_API_URL"], "POST", "/deployments/filter", json={})
            deployments = {d["name"]: d["id"] for d in found}
            wait_for(
                lambda: _online_workers(env["PREFECT_API_URL"]) >= WORKERS,
                60,
                "both workers online",
            )
            stack = Stack(env, services, deployments)
            stack.timings["server_start_s"] = server_up - started
            stack.timings["setup_s"] = time.monotonic() - started
            yield stack
        finally:
            for process in [deploy, *workers]:
                stop(process)


def _online_workers(base: str) -> int:
    workers = api(base, "POST", f"/work_pools/{POOL}/workers/filter", json={})
    return sum(1 for worker in workers if worker["status"] == "ONLINE")


def test_three_runs_on_two_workers_share_the_org_limit(stack: Stack) -> None:
    files = 8
    for run in range(3):
        stack.services.upload(
            BUCKET,
            {f"p{run}/call-{i:02d}.wav": speech_wav(1.0, seed=10 * run + i) for i in range(files)},
        )
    # Slow calls until all three runs are running, so that they really share the limit
    # (process start-up varies by seconds; a fast first run could finish alone).
    stack.emulator("PATCH", "/config", json={"latency": {"mean_s": 10.0}})
    stack.emulator("POST", "/stats/reset")
    started = time.monotonic()
    ids = [stack.run("english-fast", f"p{run}/") for run in range(3)]
    wait_for(
        lambda: all(r["state_type"] == "RUNNING" for r in stack.flow_runs(ids)),
        90,
        "all three runs running at once",
    )
    stack.emulator("PATCH", "/config", json={"latency": {"mean_s": 0.2}})

    runs = wait_for(
        lambda: (r := stack.flow_runs(ids)) and all(x["state_type"] in TERMINAL for x in r) and r,
        150,
        "three runs finished",
    )
    elapsed = time.monotonic() - started

    assert [r["state_name"] for r in runs] == ["Completed"] * 3, [r["state"] for r in runs]
    stats = stack.stats("vfast")
    assert stats["completed"] == 3 * files
    # The emulator would answer a fourth concurrent call with 429 "concurrency".
    assert stats["rejections"]["concurrency"] == 0
    assert stats["max_in_flight"] == LIMIT
    assert stack.active_slots("vfast") == 0
    overlap = _max_overlap(runs)
    assert overlap == 3
    print(f"setup {stack.timings}, three runs {elapsed:.1f} s, at most {overlap} at once")


def test_a_killed_run_holds_its_slots_until_the_lease_expires(stack: Stack) -> None:
    stack.services.upload(BUCKET, {f"k/call-{i}.wav": speech_wav(1.0, seed=i) for i in range(6)})
    # Calls slow enough that the run is surely mid-call when it is killed.
    stack.emulator("PATCH", "/config", json={"latency": {"mean_s": 30.0}})
    stack.emulator("POST", "/stats/reset")
    flow_run = stack.run("nightly", "k/")
    wait_for(lambda: stack.stats("stt")["in_flight"] == LIMIT, 90, "calls in flight")
    held = stack.active_slots("stt")
    pids = flow_run_pids(flow_run)
    assert pids, "the flow-run process was not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    stack.emulator("PATCH", "/config", json={"latency": {"mean_s": 0.1}})

    assert held == LIMIT
    assert stack.active_slots("stt") == held  # nobody gives them back for the dead run
    def reported() -> dict[str, Any] | None:
        (run,) = stack.flow_runs([flow_run])
        return run if run["state_type"] in TERMINAL else None

    crashed = wait_for(reported, 60, "the worker reporting the run")
    crashed_after = time.monotonic() - killed
    wait_for(lambda: stack.active_slots("stt") == 0, 120, "the dead run's leases expired")
    freed_after = time.monotonic() - killed
    assert crashed["state_type"] == "CRASHED"
    assert freed_after >= 30  # the lease (60 s, renewed every 20 s) not a release, freed them
    print(
        f"held {held} slots; run {crashed['state_name']} after {crashed_after:.1f} s; "
        f"slots free after {freed_after:.1f} s"
    )


def _max_overlap(runs: list[dict[str, Any]]) -> int:
    """How many of the runs were Running at the same moment, from their start and end times."""
    events = sorted(
        [(r["start_time"], 1) for r in runs if r["start_time"]]
        + [(r["end_time"], -1) for r in runs if r["end_time"]]
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak
