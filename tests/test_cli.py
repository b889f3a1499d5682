"""The `modulate-flows` command: the emulator serves, and limits sync writes Prefect limits."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
from prefect.client.orchestration import get_client
from typer.testing import CliRunner

from blocks import ModelLimit, OrgLimits
from modulate_flows.cli import app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_emulator_command_serves() -> None:
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "modulate_flows", "emulator", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/_emulator/stats", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, "the emulator exited"
                assert time.monotonic() < deadline, "the emulator did not start in 60 s"
                time.sleep(0.1)  # polling a condition: the port accepting connections
        assert response.status_code == 200
        assert "demo" in response.json()["orgs"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_limits_sync_command(prefect_server: None) -> None:
    OrgLimits(
        organization="cli-org",
        models={"stt": ModelLimit(concurrent=7), "svd": ModelLimit(concurrent=2)},
    ).save("cli-limits", overwrite=True)
    result = CliRunner().invoke(app, ["limits", "sync", "--block", "cli-limits"])
    assert result.exit_code == 0, result.output
    assert "modulate:cli-org:stt: 7" in result.output
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("modulate:cli-org:svd")
    assert limit.limit == 2
