"""Our packages' warnings reach a run's logs on the Prefect API (what the UI shows).

Prefect sends a library's log records to the API only for the loggers named in
`PREFECT_LOGGING_EXTRA_LOGGERS`, read when Prefect configures logging at import; so the
run is a child process with the environment the process pool's job variables give a
deployed run (deployments/prefect.yaml).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from test_batch_flows import good_files, settings, source
from test_reliability import START_S, child_env

from tests.prefect_server import ROOT, load_prefect_yaml

CHILD = """
import asyncio, json, sys
from flows import transcribe
from tasks.runner import RunSettings
from tasks.s3 import S3Input
args = json.loads(sys.argv[1])
state = asyncio.run(transcribe(source=S3Input.model_validate(args["source"]),
                               settings=RunSettings.model_validate(args["settings"]),
                               return_state=True))
print(state.state_details.flow_run_id, flush=True)
"""
LOGS_WAIT_S = 30.0


def pool_env() -> dict[str, str]:
    """The environment the process pool's job variables give every deployed run."""
    pools = load_prefect_yaml()["definitions"]["work_pools"]
    return {k: str(v) for k, v in pools["process"]["job_variables"]["env"].items()}


async def test_a_warning_of_ours_reaches_the_runs_logs(org_env) -> None:
    """The org's limits are not synced, so the slot pool warns that it holds them locally."""
    org_env.services.upload(org_env.bucket, good_files(2))
    args = {
        "source": source(org_env).model_dump(mode="json"),
        "settings": settings(org_env).model_dump(mode="json"),
    }
    env = {**child_env(), **pool_env(), "PREFECT_LOGGING_TO_API_ENABLED": "true"}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=env,
        capture_output=True, timeout=START_S, check=False,
    )
    assert child.returncode == 0, child.stderr.decode()[-2000:]
    flow_run_id = UUID(child.stdout.decode().split()[-1])

    async def ours() -> list[str]:
        async with get_client() as client:
            logs = await client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        return [log.message for log in logs if log.name == "tasks.slots"]

    try:
        async with asyncio.timeout(LOGS_WAIT_S):
            while not (messages := await ours()):
                await asyncio.sleep(0.2)
    except TimeoutError:
        pytest.fail(f"no tasks.slots record in the run's logs within {LOGS_WAIT_S:.0f} s")
    assert any("No active Prefect concurrency limit" in m for m in messages), messages
