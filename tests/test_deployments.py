"""deployments/prefect.yaml deploys for real: a `prefect server start`, a process pool, a deploy.

The server runs in a subprocess with its own PREFECT_HOME, apart from the session's test
harness, because `prefect deploy` is a CLI talking to a server by URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.prefect_server import (
    POOL,
    PREFECT_FILE,
    ROOT,
    load_prefect_yaml,
    prefect_cli,
    running_server,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port of 127.0.0.1; yields the CLI environment."""
    with running_server(tmp_path_factory.mktemp("prefect-home")) as env:
        yield env


@pytest.fixture(scope="module")
def deployments(server: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Create the pool, run `prefect deploy`, and return the server's deployments by name."""
    prefect_cli(server, "work-pool", "create", POOL, "--type", "process")
    names = [d["name"] for d in load_prefect_yaml()["deployments"]]
    missing = [d["name"] for d in load_prefect_yaml()["deployments"] if not _entrypoint_exists(d)]
    if missing:
        # An entrypoint still being written must not hide the others' results.
        args = [arg for name in names if name not in missing for arg in ("--name", name)]
    else:
        args = ["--all"]
    prefect_cli(server, "--no-prompt", "deploy", *args, "--prefect-file", str(PREFECT_FILE))
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


def test_every_package_that_logs_reaches_the_runs_logs(
    deployments: dict[str, dict[str, Any]],
) -> None:
    """Prefect sends a library's logs to the run's logs (the UI) only if it is named."""
    not_shipped = {"tests", "bench", "emulator"}
    shipped = [
        package for package in ROOT.iterdir()
        if (package / "__init__.py").is_file() and package.name not in not_shipped
    ]
    logging_packages = {
        package.name for package in shipped
        if any("logging.getLogger(__name__" in f.read_text() for f in package.rglob("*.py"))
    }
    assert {"modulate", "tasks"} <= logging_packages
    for name, deployment in deployments.items():
        env = deployment["job_variables"].get("env", {})
        named = set(env.get("PREFECT_LOGGING_EXTRA_LOGGERS", "").split(","))
        assert logging_packages <= named, (name, sorted(logging_packages - named))


ONE_AT_A_TIME = {"nightly", "hourly", "platform-batch"}
STREAMING = {
    "stream-transcribe": "flows/streaming.py:stream_transcribe",
    "stream-detect-synthetic-voice": "flows/streaming.py:stream_detect_synthetic_voice",
    "stream-redact-pii": "flows/streaming.py:stream_redact_pii",
}


def test_schedules_ship_inactive_and_overlap_guard(
    deployments: dict[str, dict[str, Any]], server: dict[str, str]
) -> None:
    crons = {
        name: [s["schedule"]["cron"] for s in d["schedules"]] for name, d in deployments.items()
    }
    assert crons["nightly"] == ["0 2 * * *"]
    assert crons["hourly"] == ["15 * * * *"]
    assert crons["on-demand"] == []
    # Deploying starts nothing: no schedule is active, so the scheduler makes no runs.
    assert all(not s["active"] for d in deployments.values() for s in d["schedules"])
    runs = httpx.post(f"{server['PREFECT_API_URL']}/flow_runs/filter", json={})
    assert runs.json() == []
    for name, deployment in deployments.items():
        limit = deployment["global_concurrency_limit"]
        if name in ONE_AT_A_TIME:
            assert limit["limit"] == 1, name
            assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
        else:
            assert limit is None, name
    for name, entrypoint in STREAMING.items():
        assert deployments[name]["entrypoint"] == entrypoint


def test_the_documented_command_activates_the_schedules(
    deployments: dict[str, dict[str, Any]], server: dict[str, str]
) -> None:
    command = "prefect deployment schedule resume --all"
    assert command in (ROOT / "docs" / "deploy.md").read_text()
    prefect_cli(server, *command.split()[1:])
    response = httpx.post(f"{server['PREFECT_API_URL']}/deployments/filter", json={})
    active = {d["name"]: [s["active"] for s in d["schedules"]] for d in response.json()}
    assert active["nightly"] == active["hourly"] == [True]
    prefect_cli(server, "deployment", "schedule", "pause", "--all")


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
        assert (chunk["default"], chunk["minimum"], chunk["maximum"]) == (100, 1, 1000)
        # The form shows the code's default, not a value pinned in the yaml.
        assert "chunk_size" not in deployments[name]["parameters"]["settings"], name
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
