"""Shared fixtures: one Prefect test server, one moto S3 server and one emulator for the whole run.

Each test that runs flows takes its own organisation in the emulator (so its counters
and limits are its own), its own S3 prefix and its own output directory.
"""

from __future__ import annotations

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
# pytest-xdist's workers inherit COLUMNS=80 from execnet; the CLI tests read the output as a
# user who pipes it sees it (modulate_flows/console.py), so the worker's width must not leak in.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from blocks import ModelLimit  # noqa: E402
from emulator import EmulatorConfig, ModelLimits, OrgConfig  # noqa: E402
from modulate_flows.local import LocalServices, local_services, save_blocks  # noqa: E402

# One emulator org per test that needs its own counters; the key is "key-<org>".
TEST_ORGS = [f"org{i}" for i in range(120)]


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def services() -> Iterator[LocalServices]:
    config = EmulatorConfig(
        orgs=[
            OrgConfig(
                name=org,
                velma_keys=[f"key-{org}"],
                platform_account_uuid=f"00000000-0000-4000-8000-{i:012d}",
                platform_api_key=f"platform-key-{org}",
                models={"stt": ModelLimits(concurrent=4), "svd": ModelLimits(concurrent=4)},
            )
            for i, org in enumerate(TEST_ORGS)
        ]
    )
    with local_services(config) as running:
        yield running


@dataclass
class OrgEnv:
    """One test's slice of the shared services: an org, a bucket prefix, blocks, an output dir."""

    org: str
    services: LocalServices
    bucket: str
    output: Path

    @property
    def block(self) -> str:
        return self.org

    def stats(self, model: str) -> dict[str, Any]:
        response = httpx.get(f"{self.services.emulator_url}/_emulator/stats")
        response.raise_for_status()
        return response.json()["orgs"][self.org][model]

    def set_model(self, model: str, **changes: Any) -> None:
        httpx.patch(
            f"{self.services.emulator_url}/_emulator/orgs/{self.org}/models/{model}", json=changes
        ).raise_for_status()


_next_org = iter(TEST_ORGS)


@pytest.fixture
async def org_env(
    prefect_server: None, services: LocalServices, tmp_path: Path
) -> OrgEnv:
    """A fresh org with blocks saved under its name; limits 4 at once for stt and svd."""
    org = next(_next_org)
    bucket = f"audio-{org}"
    env = OrgEnv(org=org, services=services, bucket=bucket, output=tmp_path / "out")
    await save_blocks(
        services,
        name=org,
        bucket=bucket,
        output_root=str(env.output),
        organization=org,
        api_key=f"key-{org}",
        limits={"stt": ModelLimit(concurrent=4), "svd": ModelLimit(concurrent=4)},
        platform_account=f"00000000-0000-4000-8000-{TEST_ORGS.index(org):012d}",
        platform_key=f"platform-key-{org}",
    )
    services.upload(bucket, {})
    return env


@pytest.fixture
def emulator(services: LocalServices) -> Iterator[Callable[..., Any]]:
    """Admin calls to the shared emulator; faults, latency and details are put back after."""

    def call(method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{services.emulator_url}/_emulator{path}", json=body)
        response.raise_for_status()
        return response.json()

    yield call
    call("PATCH", "/config", {
        "faults": {"error_5xx_rate": 0.0, "drop_rate": 0.0, "garbled_rate": 0.0},
        "latency": {"mean_s": 0.0}, "detail_family": "2026",
    })
