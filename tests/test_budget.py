"""The monthly audio-hours budget: real Prefect, moto S3, the emulator, events read back."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventResourceFilter
from prefect.states import State
from typer.testing import CliRunner

from blocks import ModelLimit, OrgLimits
from flows import transcribe
from modulate import RetryPolicy
from modulate.budget import BudgetBook, billing_period, run_out_date
from modulate_flows.cli import app
from modulate_flows.samples import speech_wav
from tasks import runner
from tasks.budget import EVENT_EXHAUSTED, EVENT_WARNING
from tasks.ordering import order_files
from tasks.runner import RunSettings
from tasks.s3 import AudioObject, S3Input

HOUR_MS = 3_600_000
EVENT_WAIT_SECONDS = 30


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "DEFAULT_POLICY", RetryPolicy.for_tests())


def settings(env, **kw) -> RunSettings:
    """The files go in S3 key order, so which ones the budget covers is known."""
    return RunSettings(
        credentials_block=env.block, limits_block=env.block, output_block=env.block,
        file_order="listing", **kw,
    )


async def set_budget(env, seconds: float, *, margin: float = 0.0) -> None:
    """The same monthly limit in the block and at the emulator."""
    limits = await OrgLimits.aload(env.block)
    limits.models["stt"] = ModelLimit(concurrent=4, monthly_audio_hours=seconds / 3600)
    limits.budget_margin = margin
    await limits.asave(env.block, overwrite=True)
    env.set_model("stt", monthly_audio_hours=seconds / 3600)


async def budget_events(org: str, wanted: set[str]) -> dict[str, dict]:
    """The budget events of `org`'s stt model on the Prefect server, once `wanted` arrived."""
    resource = f"modulate.budget.{org}.stt"
    deadline = asyncio.get_running_loop().time() + EVENT_WAIT_SECONDS
    async with get_client() as client:
        while True:
            page = await client.read_events(
                filter=EventFilter(resource=EventResourceFilter(id=[resource])), limit=50
            )
            found = {event.event: event.payload for event in page.events}
            if wanted <= set(found):
                return found
            assert asyncio.get_running_loop().time() < deadline, f"events so far: {set(found)}"
            await asyncio.sleep(0.2)  # polling the events API for a condition, bounded above


async def test_budget_sends_what_fits_defers_the_rest_and_the_next_period_sends_them(
    org_env,
) -> None:
    # Ten 1-second WAVs, six seconds a month in the block and at the emulator.
    org_env.services.upload(
        org_env.bucket, {f"in/call-{i:02d}.wav": speech_wav(1.0, seed=i) for i in range(10)}
    )
    await set_budget(org_env, 6.0)
    now = datetime.now(UTC)

    state: State = await transcribe(
        source=S3Input(bucket_block=org_env.block, prefix="in/"),
        # One chunk: the budget is offered the files in listing order within a chunk.
        settings=settings(org_env, chunk_size=10, budget_as_of=now),
        return_state=True,
    )
    assert state.name == "Deferred by budget"
    rows = pd.read_parquet(org_env.output / "files")
    assert rows.status.value_counts().to_dict() == {"completed": 6, "deferred_budget": 4}
    stats = org_env.stats("stt")
    assert stats["requests"] == 6
    assert stats["rejections"]["monthly"] == 0  # the budget stopped first, the service never had to
    deferred = rows[rows.status == "deferred_budget"]
    assert deferred.error_detail.str.contains("0.001667 h for the period").all()
    assert deferred.error_class.isna().all()
    # Oldest first, then by key: the four last keys wait (all objects share an upload second
    # or come in key order).
    assert sorted(deferred.source_uri.str[-11:]) == [f"call-{i:02d}.wav" for i in range(6, 10)]

    summary = await state.result()
    budget = summary.budget
    assert budget.used_hours == budget.run_hours == round(6000 / HOUR_MS, 6)
    assert budget.limit_hours == round(6000 / HOUR_MS, 6)
    assert budget.run_out == now.date()  # the limit is reached today
    usage = pd.read_parquet(org_env.output / "usage")
    assert usage.audio_duration_ms.sum() == 6000 and set(usage.model) == {"stt"}

    events = await budget_events(org_env.org, {EVENT_WARNING, EVENT_EXHAUSTED})
    assert events[EVENT_WARNING]["threshold_percent"] == 80
    assert events[EVENT_EXHAUSTED]["threshold_percent"] == 100
    assert events[EVENT_EXHAUSTED]["limit_hours"] == budget.limit_hours

    # The next period: the service's month resets, the ledger's usage is of the last period.
    httpx.post(f"{org_env.services.emulator_url}/_emulator/usage/reset").raise_for_status()
    await set_budget(org_env, 13.0)
    next_period = billing_period(now).end
    state = await transcribe(
        source=S3Input(bucket_block=org_env.block, prefix="in/"),
        settings=settings(org_env, budget_as_of=next_period),
        return_state=True,
    )
    assert state.name == "Completed"
    assert org_env.stats("stt")["requests"] == 6 + 4  # exactly the deferred files
    assert set(pd.read_parquet(org_env.output / "files").status) == {"completed"}
    budget = (await state.result()).budget
    assert budget.period_start == next_period.date()
    assert budget.used_hours == budget.run_hours == round(4000 / HOUR_MS, 6)
    # 9 s left at the pace of the last 7 days (4 s): 15.75 days after the period starts.
    assert budget.run_out == (next_period + timedelta(days=9 / (4 / 7))).date()

    # The usage command shows the first period from the ledger, with a forecast and a chart.
    command = ["usage", "--block", org_env.block, "--as-of", f"{now:%Y-%m-%dT%H:%M:%S}"]
    result = await asyncio.to_thread(CliRunner().invoke, app, command, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    line = next(row for row in result.output.splitlines() if row.startswith("│ stt"))
    # 10 s used of 13: 3 s left at 10 s a week.
    assert "0.002778" in line and "0.003611" in line and "77%" in line
    assert (now + timedelta(days=3 / (10 / 7))).date().isoformat() in line
    assert "stt: hours per day" in result.output and "█" in result.output


def _object(key: str, size: int, minute: int) -> AudioObject:
    return AudioObject(
        bucket="b", key=key, size=size, etag=key,
        last_modified=datetime(2026, 12, 1, 0, minute, tzinfo=UTC),
    )


async def test_file_order_sorts_within_a_bounded_window() -> None:
    listing = [_object("a", 30, 5), _object("b", 10, 1), _object("c", 20, 3), _object("d", 5, 0)]

    async def listed():
        for obj in listing:
            yield obj

    async def keys(order: str, window: int) -> list[str]:
        return [obj.key async for obj in order_files(listed(), order, window)]

    assert await keys("oldest", 10) == ["d", "b", "c", "a"]
    assert await keys("newest", 10) == ["a", "c", "b", "d"]
    assert await keys("smallest", 10) == ["d", "b", "c", "a"]
    assert await keys("listing", 1) == ["a", "b", "c", "d"]
    # Exact within each window of 2, windows in listing order.
    assert await keys("oldest", 2) == ["b", "a", "d", "c"]


async def test_the_budget_alert_automation_is_accepted_by_prefect(prefect_server: None) -> None:
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    text = (Path(__file__).resolve().parents[1] / "deployments" / "budget-alerts.yaml").read_text()
    (spec,) = yaml.safe_load(text)["automations"]
    automation = AutomationCore.model_validate(spec)
    assert set(automation.trigger.expect) == {EVENT_WARNING, EVENT_EXHAUSTED}
    async with get_client() as client:
        created = await client.create_automation(automation)
        try:
            stored = await client.read_automation(created)
            assert stored is not None and stored.trigger.expect == automation.trigger.expect
        finally:
            await client.delete_automation(created)


def test_billing_periods_start_on_the_blocks_day_and_wrap_the_year() -> None:
    calendar = billing_period(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert (calendar.start, calendar.end) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )
    before_the_15th = billing_period(datetime(2027, 1, 14, 12, tzinfo=UTC), start_day=15)
    assert (before_the_15th.start.date(), before_the_15th.end.date()) == (
        datetime(2026, 12, 15).date(), datetime(2027, 1, 15).date()
    )
    assert len(before_the_15th.days()) == 31
    with pytest.raises(ValueError, match="start_day"):
        billing_period(datetime(2027, 1, 1, tzinfo=UTC), start_day=31)


def test_run_out_date_at_the_last_seven_days_pace() -> None:
    now = datetime(2026, 12, 10, 12, tzinfo=UTC)
    hour = HOUR_MS
    # 70 h in 7 days is 10 h a day: 35 h left last 3.5 days.
    assert run_out_date(used_ms=65 * hour, limit_ms=100 * hour, pace_ms=70 * hour, now=now) == (
        datetime(2026, 12, 14).date()
    )
    assert run_out_date(used_ms=100 * hour, limit_ms=100 * hour, pace_ms=0, now=now) == now.date()
    assert run_out_date(used_ms=0, limit_ms=hour, pace_ms=0, now=now) is None
    assert run_out_date(used_ms=0, limit_ms=1000 * hour, pace_ms=1, now=now) is None  # 10+ years


def test_the_book_holds_estimates_charges_real_durations_and_learns_sizes() -> None:
    book = BudgetBook(limit_ms=10_000, used_before_ms=2_000, margin_ms=1_000)
    assert book.spendable_ms == 7_000
    assert book.reserve("a", 4_000) and not book.reserve("b", 3_001)
    assert book.reserve("b", 3_000) and book.spendable_ms == 0
    book.settle("a", 3_500, size_bytes=35_000, extension="mp3")  # real: 10 bytes per ms
    book.settle("b", None)  # failed: nothing charged
    assert book.used_ms == 5_500 and book.spendable_ms == 3_500
    assert book.estimate_ms(20_000, "mp3") == 2_000
    assert book.estimate_ms(16_000, "ogg") == 2_000  # the default 8,000 bytes/s
