"""Reliability: faults, a killed worker, bad inputs and secrets, on the real stack.

Every file is accounted for exactly once in the ledger, the emulator's counters say
how many calls were sent, and a canary key never leaks. docs/reliability.md is the
catalogue of bad inputs these tests hold to.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import duckdb
import httpx
import pandas as pd
import pytest
from moto.server import ThreadedMotoServer
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from prefect.states import State
from prefect_aws import S3Bucket
from pydantic import SecretStr
from test_batch_flows import fast_retries, good_files, ledger, settings, source  # noqa: F401

from blocks import ModulateCredentials
from flows import detect_synthetic_voice, redact_pii, transcribe
from modulate_flows.local import LocalServices
from modulate_flows.samples import speech_wav

pytestmark = pytest.mark.usefixtures("fast_retries")

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import asyncio, json, sys
from flows import transcribe
from tasks.runner import RunSettings
from tasks.s3 import S3Input
args = json.loads(sys.argv[1])
print("ready", flush=True)  # imports take tens of seconds on a loaded machine
asyncio.run(transcribe(source=S3Input.model_validate(args["source"]),
                       settings=RunSettings.model_validate(args["settings"])))
"""
WAIT_S = 60.0
START_S = 180.0  # a child's imports, on a machine shared with other jobs


def assert_one_row_per_file(root: Path) -> int:
    total, distinct = duckdb.connect().execute(
        f"select count(*), count(distinct (file_id, config_hash)) from "
        f"read_parquet('{root}/files/**/*.parquet', hive_partitioning=true)"
    ).fetchone()
    assert total == distinct
    return int(total)


async def test_5xx_and_dropped_connections_complete_every_file_once(org_env, emulator) -> None:
    org_env.services.upload(org_env.bucket, good_files(60))
    emulator("PATCH", "/config", {"faults": {"error_5xx_rate": 0.10, "drop_rate": 0.02}})

    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env, chunk_size=10), return_state=True
    )
    assert state.name == "Completed", state.message
    stats = org_env.stats("stt")
    assert stats["rejections"]["fault_5xx"] + stats["rejections"]["dropped"] > 0  # faults hit
    assert stats["completed"] == 60  # none sent to completion twice
    assert assert_one_row_per_file(org_env.output) == 60
    assert set(ledger(org_env).status) == {"completed"}


def child_env() -> dict[str, str]:
    """The environment of a flow run in a child process, on this session's Prefect server."""
    return {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_TO_API_ENABLED": "false",
    }


async def test_sigkill_mid_run_then_rerun_resends_at_most_3c(org_env, emulator) -> None:
    files, chunk_size, concurrent = 160, 10, 4  # the org's stt limit is 4 (conftest)
    lease = 2.0  # the killed run's claims free up one lease after its last heartbeat
    org_env.services.upload(org_env.bucket, good_files(files))
    emulator("PATCH", "/config", {"latency": {"mean_s": 0.05}})
    run_settings = settings(org_env, chunk_size=chunk_size, claim_lease_seconds=lease)
    args = {
        "source": source(org_env).model_dump(mode="json"),
        "settings": run_settings.model_dump(mode="json"),
    }
    threshold = random.Random(12).randint(30, files - 40)
    errors = (org_env.output.parent / "child.err").open("wb")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)], cwd=ROOT, env=child_env(),
        stdout=subprocess.PIPE, stderr=errors,  # a file: a full pipe would stall the child
    )
    try:
        ready = asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)  # type: ignore[union-attr]
        assert (await asyncio.wait_for(ready, START_S)).strip() == b"ready"
        deadline = time.monotonic() + WAIT_S
        while org_env.stats("stt")["completed"] < threshold:
            assert child.poll() is None, (org_env.output.parent / "child.err").read_text()[-2000:]
            assert time.monotonic() < deadline, "the child never reached the threshold"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        errors.close()
    sent_before_kill = org_env.stats("stt")["requests"]
    assert sent_before_kill < files, "the child finished before the kill"

    emulator("PATCH", "/config", {"latency": {"mean_s": 0.0}})
    state: State = await transcribe(
        source=source(org_env), settings=run_settings, return_state=True
    )
    assert state.name == "Completed", state.message
    assert assert_one_row_per_file(org_env.output) == files
    assert set(ledger(org_env).status) == {"completed"}
    # At most 3C files held the writer's room when the kill came: calls in flight, files
    # waiting for a slot, results waiting to be written (tasks/results_writer.py
    # `ResultsWriter.window`; keep in sync). Before the writer, a chunk was written when its
    # slowest file ended: up to 60 files here.
    resent = org_env.stats("stt")["requests"] - files
    assert 0 <= resent <= 3 * concurrent, (resent, sent_before_kill)


# --- the bad-input catalogue (docs/reliability.md) ---------------------------------------

# key -> (bytes, stt status, svd status, error class, words the error_detail must hold)
PER_FILE: dict[str, tuple[bytes, str, str, str | None, str]] = {
    "in/bad/empty.wav": (b"", "failed", "failed", "BadInput", "empty"),
    "in/bad/blip.wav": (speech_wav(0.2, seed=1), "completed", "failed", None, "500 ms"),
    "in/bad/readme.txt": (b"not audio", "skipped", "skipped", None, "extension 'txt'"),
    "in/bad/notes.wav": (b"meeting notes, not audio\n" * 40, "failed", "failed", "BadInput", ""),
    "in/bad/corrupt.wav": (b"RIFX" + bytes(range(256)) * 8, "failed", "failed", "BadInput", ""),
    "in/odd/with space.wav": (speech_wav(1.0, seed=2), "completed", "completed", None, ""),
    "in/odd/\u00fcn\u00efc\u00f8d\u00e9 \u901a\u8a71.wav": (
        speech_wav(1.0, seed=3), "completed", "completed", None, ""),
    "in/a/same.wav": (speech_wav(1.0, seed=4), "completed", "completed", None, ""),
    "in/b/same.wav": (speech_wav(1.0, seed=5), "completed", "completed", None, ""),
}


async def test_bad_files_each_get_their_documented_outcome(org_env) -> None:
    org_env.services.upload(org_env.bucket, {k: v[0] for k, v in PER_FILE.items()})
    await transcribe(source=source(org_env), settings=settings(org_env, chunk_size=4),
                     return_state=True)
    await detect_synthetic_voice(source=source(org_env), settings=settings(org_env),
                                 return_state=True)
    rows = ledger(org_env)
    assert len(rows) == 2 * len(PER_FILE)  # nothing lost, nothing doubled
    for model, column in (("stt", 1), ("svd", 2)):
        by_key = rows[rows.model == model].set_index("source_uri")
        for key, expected in PER_FILE.items():
            row = by_key.loc[f"s3://{org_env.bucket}/{key}"]
            assert row.status == expected[column], (model, key, row.error_detail)
            if row.status == "failed":
                assert len(row.error_detail) > 10, (model, key)
            if expected[column] != "completed" and expected[4]:
                assert expected[4] in row.error_detail, (model, key, row.error_detail)
            if expected[3] and row.status == "failed":
                assert row.error_class == expected[3], (model, key)
        same = by_key[by_key.index.str.endswith("/same.wav")]
        assert same.file_id.nunique() == 2  # the same name under two prefixes: two files


async def test_missing_bucket_fails_the_run_naming_the_bucket(org_env) -> None:
    aws = org_env.services.aws_credentials()
    await S3Bucket(bucket_name="no-such-bucket", credentials=aws).asave(
        org_env.block, overwrite=True
    )
    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.is_failed()
    assert "s3://no-such-bucket/" in state.message and "NoSuchBucket" in state.message
    assert not (org_env.output / "files").exists()


async def test_model_not_enabled_stops_the_run_and_marks_no_file(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(3))
    org_env.set_model("stt", enabled=False)
    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.is_failed()
    assert "not enabled" in state.message, state.message
    assert not (org_env.output / "files").exists()


async def test_service_down_fails_the_files_as_transient_and_a_rerun_sends_them(org_env) -> None:
    org_env.services.upload(org_env.bucket, good_files(5))
    await ModulateCredentials(
        api_key=SecretStr(f"key-{org_env.org}"), base_url="http://127.0.0.1:9"
    ).asave(org_env.block, overwrite=True)
    state: State = await transcribe(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.name == "Completed with failures", state.message
    rows = ledger(org_env)
    assert set(rows.status) == {"failed"} and set(rows.error_class) == {"Transient"}
    await ModulateCredentials(
        api_key=SecretStr(f"key-{org_env.org}"), base_url=org_env.services.emulator_url
    ).asave(org_env.block, overwrite=True)
    state = await transcribe(source=source(org_env), settings=settings(org_env), return_state=True)
    assert state.name == "Completed"
    assert set(ledger(org_env).status) == {"completed"}


async def test_s3_down_mid_run_fails_the_unread_files_only(org_env, emulator) -> None:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    down = LocalServices(s3_endpoint=f"http://{host}:{port}", emulator=org_env.services.emulator)
    try:
        down.upload(org_env.bucket, good_files(60))
        await S3Bucket(bucket_name=org_env.bucket, credentials=down.aws_credentials()).asave(
            org_env.block, overwrite=True
        )
        emulator("PATCH", "/config", {"latency": {"mean_s": 0.05}})
        run = asyncio.ensure_future(transcribe(
            source=source(org_env), settings=settings(org_env, chunk_size=5), return_state=True
        ))
        deadline = time.monotonic() + WAIT_S
        while org_env.stats("stt")["completed"] < 10:
            assert not run.done() and time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        moto.stop()
    state: State = await run
    assert state.name == "Completed with failures", state.message
    rows = ledger(org_env)
    assert len(rows) == 60  # every listed file has its row
    failed = rows[rows.status == "failed"]
    assert len(failed) > 0 and failed.error_detail.str.contains("could not read").all()
    assert (rows.status == "completed").sum() == org_env.stats("stt")["completed"]


# --- wrong S3 credentials: a moto server of its own that checks signatures ----------------

S3_ALL = json.dumps({"Version": "2012-10-17",
                     "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]})
S3_READ = json.dumps({"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]})


@dataclass
class CheckedS3:
    """A moto server that checks signatures, a bucket on it and the access keys of three users."""

    services: LocalServices
    reader: tuple[str, str]  # (key id, secret) of a user allowed s3:*
    stranger: tuple[str, str]  # a valid key of a user with no policy
    listener: tuple[str, str]  # a user who may list and read, not write


@pytest.fixture
def checked_s3(org_env, tmp_path: Path) -> Iterator[CheckedS3]:
    """moto checks signatures after INITIAL_NO_AUTH_ACTION_COUNT requests, process-wide: it
    gets a process of its own so the session's shared moto keeps accepting any key."""
    files = good_files(2)
    # The requests let through unsigned: 3 users, 2 policies, 3 keys, the bucket, the files.
    setup_requests = 8 + 1 + len(files)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "moto.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(setup_requests)},
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, (tmp_path / "moto.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "moto server did not start"
            try:
                httpx.get(f"{endpoint}/moto-api/", timeout=1).raise_for_status()  # not counted
                break
            except httpx.TransportError:
                time.sleep(0.05)
        checked = LocalServices(s3_endpoint=endpoint, emulator=org_env.services.emulator)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = []
        for user, policy in (("reader", S3_ALL), ("stranger", None), ("listener", S3_READ)):
            iam.create_user(UserName=user)
            if policy is not None:
                iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=policy)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            keys.append((key["AccessKeyId"], key["SecretAccessKey"]))
        checked.upload(org_env.bucket, files)
        yield CheckedS3(services=checked, reader=keys[0], stranger=keys[1], listener=keys[2])
    finally:
        server.terminate()
        server.wait(10)
        log.close()


async def use_keys(org_env, checked: CheckedS3, key_id: str, secret: str) -> None:
    aws = checked.services.aws_credentials().model_copy(
        update={"aws_access_key_id": key_id, "aws_secret_access_key": SecretStr(secret)}
    )
    await S3Bucket(bucket_name=org_env.bucket, credentials=aws).asave(
        org_env.block, overwrite=True
    )


async def test_wrong_s3_credentials_fail_the_run_at_listing_naming_the_block(
    org_env, checked_s3
) -> None:
    reader_id, reader_secret = checked_s3.reader
    wrong = {
        "SignatureDoesNotMatch": (reader_id, "wrong-secret-canary-7e21"),
        "InvalidAccessKeyId": ("AKIAUNKNOWNKEY000000", "wrong-secret-canary-7e21"),
        "AccessDenied": checked_s3.stranger,
    }
    for code, (key_id, secret) in wrong.items():
        await use_keys(org_env, checked_s3, key_id, secret)
        state: State = await transcribe(
            source=source(org_env), settings=settings(org_env), return_state=True
        )
        assert state.is_failed(), (code, state.name)
        assert f"S3 Bucket block {org_env.block!r}" in state.message, state.message
        assert f"s3://{org_env.bucket}/in/" in state.message and code in state.message
        assert secret not in state.message and reader_secret not in state.message
        assert not (org_env.output / "files").exists()  # no ledger row
    assert org_env.stats("stt")["requests"] == 0

    # The right key on the same server: the refusals above were the signature check.
    await use_keys(org_env, checked_s3, reader_id, reader_secret)
    state = await transcribe(source=source(org_env), settings=settings(org_env),
                             return_state=True)
    assert state.name == "Completed", state.message
    assert list(ledger(org_env).status) == ["completed", "completed"]


async def test_a_refused_redacted_mp3_fails_its_file_and_the_run_goes_on(
    org_env, checked_s3
) -> None:
    # The listener may read the audio but not write the redacted MP3 back (AccessDenied).
    await use_keys(org_env, checked_s3, *checked_s3.listener)
    state: State = await redact_pii(
        source=source(org_env), settings=settings(org_env), return_state=True
    )
    assert state.name == "Completed with failures", state.message
    rows = ledger(org_env)
    assert list(rows.status) == ["failed", "failed"]
    assert rows.error_detail.str.contains("output could not be written").all()
    assert rows.error_detail.str.contains("AccessDenied").all()
    stats = org_env.stats("pii")
    assert stats["requests"] == stats["completed"] == 2  # each call sent once, none again


# --- secrets ------------------------------------------------------------------------------

CANARY = "canary-key-5f0c2a9e7d31"


async def test_a_canary_key_appears_in_no_log_artifact_parquet_error_or_parameter(
    org_env, services, caplog, capfd
) -> None:
    caplog.set_level(logging.DEBUG)
    prefect_logger = logging.getLogger("prefect")  # it does not propagate to the root
    prefect_logger.addHandler(caplog.handler)
    # The emulator runs in this process: give the org the canary as a second valid key.
    services.emulator.state.config.org(org_env.org).velma_keys.append(CANARY)
    org_env.services.upload(
        org_env.bucket, good_files(4) | {k: PER_FILE[k][0] for k in list(PER_FILE)[:5]}
    )
    texts: list[str] = []
    try:
        for key in (CANARY, CANARY + "-refused"):  # a run that works, then one refused
            await ModulateCredentials(
                api_key=SecretStr(key), base_url=org_env.services.emulator_url
            ).asave(org_env.block, overwrite=True)
            state: State = await transcribe(
                source=source(org_env), settings=settings(org_env), return_state=True
            )
            result = await state.aresult(raise_on_failure=False)
            texts += [state.message or "", str(result), repr(result)]
        assert state.is_failed()  # the refused key stopped the second run
    finally:
        prefect_logger.removeHandler(caplog.handler)
    assert "completed" in set(ledger(org_env).status)  # the canary did the work

    captured = capfd.readouterr()
    texts += [caplog.text, captured.out, captured.err]
    async with get_client() as client:
        texts += [a.model_dump_json() for a in await client.read_artifacts()]
        texts += [run.model_dump_json() for run in await client.read_flow_runs()]
        texts += [run.model_dump_json() for run in await client.read_task_runs()]
    for path in org_env.output.rglob("*.parquet"):
        texts.append(path.read_bytes().decode("latin-1"))
        texts.append(pd.read_parquet(path).to_json())
    assert len(texts) > 10
    leaks = [text[max(0, text.find(CANARY) - 80):][:200] for text in texts if CANARY in text]
    assert not leaks
