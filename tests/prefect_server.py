"""A real `prefect server start` in a subprocess, and the Prefect CLI run against it.

The deployment and worker tests need a server reachable by URL from other processes
(`prefect deploy`, `prefect worker start`, the flow-run subprocesses), which the
session's in-process test harness is not. Each server gets its own PREFECT_HOME.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

__all__ = [
    "POOL",
    "PREFECT",
    "PREFECT_FILE",
    "ROOT",
    "load_prefect_yaml",
    "prefect_cli",
    "running_server",
    "start_prefect",
    "stop",
    "wait_ok",
]

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "modulate-process"
STARTUP_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 180.0


def load_prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_FILE.read_text())


@contextlib.contextmanager
def running_server(
    home: Path, settings: Mapping[str, str] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
) -> Iterator[dict[str, str]]:
    """Run `prefect server start` on a free port of 127.0.0.1 until the block ends.

    Yields the environment for clients of that server (PREFECT_API_URL, PREFECT_HOME and
    `settings`); the server itself also starts with `settings` (e.g. service intervals).
    Its output goes to `home/server.log`.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(settings or {}),
    }
    # A profile or an API URL from the caller's environment would point elsewhere.
    env.pop("PREFECT_PROFILES_PATH", None)
    env.pop("PREFECT_API_URL", None)
    # The UI asks the server where its API is; the default assumes port 4200.
    server_env = {**env, "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    with (home / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
            _wait_healthy(env["PREFECT_API_URL"], process, startup_timeout)
            yield env
        finally:
            stop(process)


def prefect_cli(env: Mapping[str, str], *args: str) -> str:
    """Run `prefect <args>` from the project root; fail with its output unless it succeeds."""
    result = subprocess.run(
        [*PREFECT, *args],
        env=dict(env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def start_prefect(env: Mapping[str, str], *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start `prefect <args>` from the project root in the background, its output to `log`."""
    with log.open("wb") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [*PREFECT, *args], env=dict(env), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def wait_ok(process: subprocess.Popen[bytes], log: Path, timeout: float = CLI_TIMEOUT_S) -> None:
    """Wait for a background `prefect` command; fail with the end of its log unless it succeeded."""
    assert process.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-3000:]


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Terminate a process we started, and kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _wait_healthy(api_url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)  # polling the health condition, not waiting a fixed time
    raise TimeoutError(f"prefect server not healthy after {timeout:.0f} s")
