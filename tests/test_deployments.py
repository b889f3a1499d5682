"""deployments/prefect.yaml deploys for real: a `prefect server start`, a process pool, a deploy.

The server runs in a subprocess with its own PREFECT_HOME, apart from the session's test
harness, because `prefect deploy` is a CLI talking to a server by URL.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "modulate-process"
STARTUP_TIMEOUT_S = 120.0
CLI_TIMEOUT_S = 180.0


def load_prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_FILE.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port of 127.0.0.1; yields the CLI environment."""
    home = tmp_path_factory.mktemp("prefect-home")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
    env.pop("PREFECT_PROFILES_PATH", None)
    log = (home / "server.log").open("wb")
    process = subprocess.Popen(
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(env["PREFECT_API_URL"], process)
        yield env
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def deployments(server: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Create the pool, run `prefect deploy`, and return the server's deployments by name."""
    _prefect(server, "work-pool", "create", POOL, "--type", "process")
    names = [d["name"] for d in load_prefect_yaml()["deployments"]]
    missing = [d["name"] for d in load_prefect_yaml()["deployments"] if not _entrypoint_exists(d)]
    if missing:
        # An entrypoint still being written must not hide the others' results.
        args = [arg for name in names if name not in missing for arg in ("--name", name)]
    else:
        args = ["--all"]
    _prefect(server, "--no-prompt", "deploy", *args, "--prefect-file", str(PREFECT_FILE))
    response = httpx.post(f"{server['PREFECT_API_URL']}/deployments/filter", json={})
    response.raise_for_status()
    return {d["name"]: d for d in response.json()}


def test_every_deployment_exists_on_the_process_pool(
    deployments: dict[str, dict[str, Any]],
) -> None:
    declared = load_prefect_yaml()["deployments"]
    for spec in declared:
        if not _entrypoint_exists(spec):
            pytest.fail(f"{spec['entrypoint']} does not exist (deployment {spec['name']!r})")
        deployment = deployments[spec["name"]]
        assert deployment["entrypoint"] == spec["entrypoint"]
        assert deployment["work_pool_name"] == POOL
    assert set(deployments) == {spec["name"] for spec in declared}


def test_schedules_and_overlap_guard(deployments: dict[str, dict[str, Any]]) -> None:
    crons = {
        name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployments.items()
    }
    assert crons["nightly"] == ["0 2 * * *"]
    assert crons["hourly"] == ["15 * * * *"]
    assert crons["on-demand"] == []
    for name in ("nightly", "hourly"):
        assert deployments[name]["global_concurrency_limit"]["limit"] == 1
        assert deployments[name]["concurrency_options"]["collision_strategy"] == "ENQUEUE"


def test_run_form_has_typed_fields_with_help(deployments: dict[str, dict[str, Any]]) -> None:
    for name in ("nightly", "hourly", "on-demand"):
        schema = deployments[name]["parameter_openapi_schema"]
        assert {"source", "settings"} <= set(schema["properties"]), name
        definitions = schema["definitions"]
        for model, fields in [
            ("S3Input", {"bucket_block", "prefix", "pattern", "modified_since", "max_files"}),
            ("RunSettings", {"credentials_block", "limits_block", "output_block", "chunk_size"}),
        ]:
            assert model in definitions, (name, sorted(definitions))
            properties = definitions[model]["properties"]
            assert fields <= set(properties), (name, model)
            for field in fields:
                assert properties[field].get("description"), (name, model, field)
        chunk = definitions["RunSettings"]["properties"]["chunk_size"]
        assert (chunk["default"], chunk["minimum"], chunk["maximum"]) == (50, 1, 1000)
    nightly = deployments["nightly"]["parameters"]
    assert nightly["source"]["prefix"] == "calls/"
    assert nightly["settings"]["credentials_block"] == "modulate"


def test_shared_settings_are_anchors_and_no_secret_is_written() -> None:
    config = load_prefect_yaml()
    pool = config["definitions"]["work_pools"]["process"]
    settings = config["definitions"]["settings"]
    for spec in config["deployments"]:
        assert spec["work_pool"] is pool  # one anchor, not copies
        if "settings" in spec.get("parameters", {}):
            assert spec["parameters"]["settings"] is settings
    text = PREFECT_FILE.read_text().lower()
    for word in ("api_key", "apikey", "secret_access_key", "password", "token:"):
        assert word not in text


def _entrypoint_exists(spec: dict[str, Any]) -> bool:
    return (ROOT / spec["entrypoint"].split(":", 1)[0]).is_file()


def _prefect(env: dict[str, str], *args: str) -> None:
    result = subprocess.run(
        [*PREFECT, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _wait_healthy(api_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited with {process.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)  # polling the health condition, not waiting a fixed time
    raise TimeoutError(f"prefect server not healthy after {STARTUP_TIMEOUT_S:.0f} s")
