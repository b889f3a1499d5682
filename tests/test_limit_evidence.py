"""Issue 11's cases end to end: the emulator switched to a detail family, and a service limit
below (or a key other than) what the blocks say. Real Prefect, moto S3, emulator on a socket.

Case 3 (the lease layer under Prefect API faults) and case 4 (fair sharing) are in
tests/test_slots.py; the throughput figures of cases 1 and 4 are in bench/ (BENCHMARKS.md).
"""

from __future__ import annotations

import httpx
import pandas as pd
import pytest
from prefect.states import State
from pydantic import SecretStr

from blocks import ModelLimit, ModulateCredentials, OrgLimits
from flows import detect_synthetic_voice, stream_detect_synthetic_voice, transcribe
from modulate import RetryPolicy
from modulate_flows.samples import speech_wav
from tasks import runner
from tasks.runner import RunSettings
from tasks.s3 import S3Input

pytestmark = pytest.mark.usefixtures("policy")


def files(n: int, prefix: str = "in/") -> dict[str, bytes]:
    return {f"{prefix}call-{i:03d}.wav": speech_wav(1.0, seed=i) for i in range(n)}


def settings(env, **kw) -> RunSettings:
    return RunSettings(
        credentials_block=env.block, limits_block=env.block, output_block=env.block, **kw
    )


def family(env, name: str) -> None:
    httpx.patch(
        f"{env.services.emulator_url}/_emulator/config", json={"detail_family": name}
    ).raise_for_status()


@pytest.fixture
def policy(monkeypatch: pytest.MonkeyPatch):
    """Install a zero-wait policy (overrides given) as the runs' default."""

    def install(**overrides: object) -> None:
        monkeypatch.setattr(runner, "DEFAULT_POLICY", RetryPolicy.for_tests(**overrides))

    install()
    return install


@pytest.fixture(autouse=True)
def back_to_2026(org_env):
    yield
    family(org_env, "2026")


async def declare(env, model: str, concurrent: int) -> None:
    limits = await OrgLimits.aload(env.block)
    limits.models[model] = ModelLimit(concurrent=concurrent)
    await limits.asave(env.block, overwrite=True)
    await limits.sync()


async def test_block_above_the_service_limit_completes_every_file(org_env, caplog) -> None:
    """Case 1: the block says 10, the service takes 4, every refusal "Insufficient credits."."""
    family(org_env, "2026")
    await declare(org_env, "stt", 10)
    org_env.set_model("stt", concurrent=4)
    httpx.patch(
        f"{org_env.services.emulator_url}/_emulator/config", json={"latency": {"mean_s": 0.02}}
    ).raise_for_status()
    try:
        org_env.services.upload(org_env.bucket, files(150))
        state: State = await transcribe(
            source=S3Input(bucket_block=org_env.block, prefix="in/"),
            settings=settings(org_env, chunk_size=50), return_state=True,
        )
    finally:
        httpx.patch(
            f"{org_env.services.emulator_url}/_emulator/config", json={"latency": {"mean_s": 0}}
        ).raise_for_status()
    assert state.name == "Completed", state.message
    ledger = pd.read_parquet(org_env.output / "files")
    assert ledger.status.value_counts().to_dict() == {"completed": 150}
    stats = org_env.stats("stt")
    assert stats["max_in_flight"] == 4 and stats["completed"] == 150
    assert stats["rejections"].get("monthly", 0) == 0
    warned = [r.getMessage() for r in caplog.records if "accepted at most" in r.getMessage()]
    assert len(warned) == 1 and f"limits block '{org_env.block}' says 10 for stt" in warned[0]
    # The first warning's count is that of its moment, off by one or two either way; the
    # run's summary names a bound: the calls of ours that overlapped a refused one, which
    # can never be fewer than the service held.
    took = (await state.result()).service_took_at_most
    assert took is not None and 4 <= took < 10
    told = [r.getMessage() for r in caplog.records if "took at most" in r.getMessage()]
    assert told == [
        f"limits block '{org_env.block}' says 10 for stt; in this run the service refused "
        f"a call while {took} of ours were on the wire, so it took at most {took} at once"
    ]


@pytest.mark.parametrize("detail_family", ["2026", "legacy"])
@pytest.mark.parametrize("flow", [detect_synthetic_voice, stream_detect_synthetic_voice])
async def test_svd_wrong_key_fails_the_run_naming_the_block(
    org_env, detail_family: str, flow
) -> None:
    """Case 2: SVD's 403 (or 4003) with no success ever is an access failure, not Deferred."""
    family(org_env, detail_family)
    await ModulateCredentials(
        api_key=SecretStr("wrong-key-canary"), base_url=org_env.services.emulator_url
    ).asave(org_env.block, overwrite=True)
    org_env.services.upload(org_env.bucket, files(12))
    state: State = await flow(
        source=S3Input(bucket_block=org_env.block, prefix="in/"), settings=settings(org_env),
        return_state=True,
    )
    assert state.is_failed(), state.name
    assert "Credentials block" in state.message and org_env.block in state.message
    assert "wrong-key-canary" not in state.message
    assert not (org_env.output / "files").exists()  # no file was marked


@pytest.mark.parametrize("detail_family", ["2026", "legacy"])
async def test_svd_refusals_after_successes_are_a_limit(org_env, detail_family: str) -> None:
    """The same 403 after successes in the run is weighed as the monthly limit."""
    family(org_env, detail_family)
    org_env.services.upload(org_env.bucket, files(20))
    org_env.set_model("svd", monthly_audio_hours=6 / 3600)  # six one-second files
    state: State = await detect_synthetic_voice(
        source=S3Input(bucket_block=org_env.block, prefix="in/"),
        settings=settings(org_env, chunk_size=5), return_state=True,
    )
    assert state.name == "Deferred", state.message
    counts = pd.read_parquet(org_env.output / "files").status.value_counts().to_dict()
    assert counts == {"completed": 6, "deferred_quota": 14}
    # The first refusal, at most C - 1 calls sent alongside it, then at most C sent after it.
    assert org_env.stats("svd")["rejections"]["monthly"] <= 4 + 4


@pytest.mark.parametrize("detail_family", ["2026", "legacy"])
async def test_an_exhausted_month_with_a_block_above_the_service(
    org_env, detail_family: str
) -> None:
    """A real exhaustion still stops fast when the block says more than the service takes."""
    family(org_env, detail_family)
    await declare(org_env, "stt", 8)
    org_env.set_model("stt", concurrent=4, monthly_audio_hours=0.0)
    org_env.services.upload(org_env.bucket, files(40))
    state: State = await transcribe(
        source=S3Input(bucket_block=org_env.block, prefix="in/"), settings=settings(org_env),
        return_state=True,
    )
    assert state.name == "Deferred", state.message
    counts = pd.read_parquet(org_env.output / "files").status.value_counts().to_dict()
    assert counts == {"deferred_quota": 40}
    assert sum(org_env.stats("stt")["rejections"].values()) <= 8 + 8  # the first C, then C


async def test_a_stuck_concurrency_counter_defers_within_the_budget(org_env, policy) -> None:
    """Case 5: "too many at once" forever ends in deferred_concurrency, not a hung run."""
    family(org_env, "legacy")  # "Concurrent request limit exceeded.": explicit, never quota
    policy(concurrency_budget_s=20.0)
    org_env.set_model("stt", concurrent=0)
    org_env.services.upload(org_env.bucket, files(6))
    state: State = await transcribe(
        source=S3Input(bucket_block=org_env.block, prefix="in/"), settings=settings(org_env),
        return_state=True,
    )
    assert state.name == "Deferred", state.message
    rows = pd.read_parquet(org_env.output / "files")
    assert set(rows.status) == {"deferred_concurrency"}
    assert set(rows.error_detail) == {"the service kept refusing for concurrency for 0.333 min"}
