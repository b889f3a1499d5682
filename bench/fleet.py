"""A real Prefect server, a deployment and process workers: runs in processes of their own.

For the bench modes where several runs share one org's limit (bench/shared.py, issue 11;
bench/workers.py, issue 16). The server, `prefect deploy` and the workers are started with
the helpers the worker tests use (tests/prefect_server.py). Each run is a flow run of the
`english-fast` deployment (vfast, no one-at-a-time guard) with its own block names, so
each run can have its own emulator key (and so its own in-flight count at the emulator)
while the limits blocks all name one organisation: one Prefect limit for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
from prefect.client.schemas.objects import FlowRun
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from bench.services import BenchServices
from blocks import ModelLimit, OrgLimits
from modulate_flows.local import save_blocks
from tests.prefect_server import (
    POOL,
    PREFECT_FILE,
    prefect_cli,
    running_server,
    start_prefect,
    stop,
)

__all__ = ["DEPLOYMENT", "MODEL", "Fleet", "running_fleet"]

DEPLOYMENT = "english-fast"
MODEL = "vfast"
FLOW = "modulate-transcribe-english-fast"
ONLINE_TIMEOUT_S = 120.0
# A fresh server migrates its database at start-up: 94 s measured on 2 loaded cores.
SERVER_STARTUP_TIMEOUT_S = 300.0
POLL_S = 0.5
# Expired leases swept every second (15 s by default); workers poll every second (15 s);
# run logs stay in the run's process (the bench reads the emulator, not the logs).
SERVER_SETTINGS = {
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
    "PREFECT_WORKER_QUERY_SECONDS": "1",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


@dataclass
class Fleet:
    """The server's client environment and the deployment runs are created from."""

    env: dict[str, str]
    deployment_id: UUID
    home: Path

    async def save_run_blocks(
        self, services: BenchServices, *, name: str, bucket: str, organization: str,
        concurrent: int, api_key: str | None = None,
    ) -> None:
        """Blocks for one run under `name`: the emulator key `api_key` ("key-<name>" by
        default), a limits block of `organization` (one Prefect limit per organisation)."""
        await save_blocks(
            services.local, name=name, bucket=bucket, output_root=str(self.home / "out" / name),
            organization=organization, api_key=api_key or f"key-{name}",
            limits={MODEL: ModelLimit(concurrent=concurrent)},
        )
        await (await OrgLimits.aload(name)).sync()

    async def run(self, *, blocks: str, prefix: str, files: int, chunk_size: int = 100) -> UUID:
        """Create a flow run of the deployment over `files` objects under `prefix`."""
        parameters: dict[str, Any] = {
            "source": {"bucket_block": blocks, "prefix": prefix, "max_files": files},
            "settings": {"credentials_block": blocks, "limits_block": blocks,
                         "output_block": blocks, "chunk_size": chunk_size},
        }
        async with get_client() as client:
            created = await client.create_flow_run_from_deployment(
                self.deployment_id, parameters=parameters, name=blocks
            )
        return created.id

    async def wait_final(self, ids: list[UUID], timeout: float) -> list[FlowRun]:
        """The flow runs once every one of them is in a final state; fails past `timeout`."""
        deadline = time.monotonic() + timeout
        async with get_client() as client:
            while True:
                runs = [await client.read_flow_run(i) for i in ids]
                if all(r.state is not None and r.state.is_final() for r in runs):
                    return runs
                if time.monotonic() > deadline:
                    states = [r.state.name if r.state else None for r in runs]
                    raise TimeoutError(f"flow runs not finished in {timeout:.0f} s: {states}")
                await asyncio.sleep(POLL_S)

    async def active_slots(self, limit: str) -> int:
        async with get_client() as client:
            found = await client.read_global_concurrency_limit_by_name(limit)
        return int(found.active_slots)


@contextlib.contextmanager
def running_fleet(
    home: Path, workers: int, database_url: str | None = None
) -> Iterator[Fleet]:
    """A `prefect server` (on `database_url`, else SQLite in `home`), the deployment, and
    `workers` process workers; this process's Prefect client points at it meanwhile."""
    settings = dict(SERVER_SETTINGS)
    if database_url is not None:
        settings["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    with running_server(home, settings, SERVER_STARTUP_TIMEOUT_S) as env:
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        prefect_cli(
            env, "--no-prompt", "deploy", "--name", DEPLOYMENT,
            "--prefect-file", str(PREFECT_FILE),
        )
        started = [
            start_prefect(env, "worker", "start", "--pool", POOL, "--name", f"worker-{i}",
                          log=home / f"worker-{i}.log")
            for i in range(workers)
        ]
        try:
            with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
                deployment_id = asyncio.run(_wait_ready(workers))
                try:
                    yield Fleet(env=env, deployment_id=deployment_id, home=home)
                finally:
                    # This process's events (block loads) go to the server before it stops,
                    # as prefect_test_harness does, not into connection errors after.
                    EventsWorker.drain_all()
        finally:
            for process in started:
                stop(process)


async def _wait_ready(workers: int) -> UUID:
    """The deployment's id, once `workers` workers of the pool are online."""
    deadline = time.monotonic() + ONLINE_TIMEOUT_S
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(f"{FLOW}/{DEPLOYMENT}")
        online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        while len(await client.read_workers_for_work_pool(POOL, worker_filter=online)) < workers:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workers} workers not online in {ONLINE_TIMEOUT_S:.0f} s")
            await asyncio.sleep(POLL_S)
    return deployment.id
