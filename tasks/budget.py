"""Spend a model's monthly audio hours deliberately: the gate before each call, and the report.

A batch run opens one `BudgetGate` for its model. It reads the billing period's usage from
the `usage` table (tasks/usage.py), estimates each file before it is sent (the WAV header
of the audio read for the call; else size and format, at the bytes per second the run has
measured), and defers what would not fit in the limit less the safety margin as
`deferred_budget`, with the figures, before the service refuses anything. Real durations
replace the estimates after each call. It emits Prefect events when the model crosses 80%
and 100% of its limit, and reports the period's use, this run's and the run-out date at the
pace of the last 7 days. `order_files` puts the backlog in the order the budget is spent in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prefect.events import emit_event
from pydantic import BaseModel, Field

from blocks import OrgLimits
from modulate import wav_duration_ms
from modulate.budget import (
    FORECAST_HORIZON_DAYS,
    MS_PER_HOUR,
    PACE_DAYS,
    BillingPeriod,
    BudgetBook,
    billing_period,
    run_out_date,
)
from store.location import OutputLocation
from tasks.s3 import AudioObject
from tasks.usage import read_daily_usage

__all__ = [
    "EVENT_EXHAUSTED",
    "EVENT_WARNING",
    "BudgetGate",
    "BudgetReport",
    "open_budget",
    "usage_report",
]

logger = logging.getLogger(__name__)

WARNING_FRACTION = 0.8
EVENT_WARNING = "modulate.budget.warning"  # the model's period use crossed 80% of its limit
EVENT_EXHAUSTED = "modulate.budget.exhausted"  # crossed 100%, or a file was deferred for it
# How long a file read early waits for the files offered before it to be read and decided;
# past it, it is decided anyway (the order is then approximate, never a stall).
ORDER_WAIT_SECONDS = 60.0
USAGE_LISTING_THREADS = 8  # one listing per day partition; on S3 each is a round trip
HOURS_DIGITS = 6  # 3.6 ms: a few seconds' budget still reads true


class BudgetReport(BaseModel):
    """One model's monthly audio hours, as the run's artifact and `modulate-flows usage` show."""

    model: str
    period_start: date = Field(description="First day of the billing period (UTC).")
    period_end: date = Field(description="Day the next period starts (UTC).")
    limit_hours: float
    used_hours: float = Field(description="Used in the period so far, this run included.")
    run_hours: float = Field(description="Used by this run.")
    margin_hours: float = Field(description="Left unspent as a safety margin.")
    pace_hours_per_day: float = Field(description=f"Mean use per day over the last {PACE_DAYS}.")
    run_out: date | None = Field(
        description=f"When the limit is reached at the pace of the last {PACE_DAYS} days; "
        f"None when nothing was used in them, or not within {FORECAST_HORIZON_DAYS} days."
    )
    daily_hours: dict[date, float] = Field(
        default_factory=dict, description="Hours used per day of the period, before this run."
    )

    def lines(self) -> list[tuple[str, Any]]:
        """Measure and value pairs for a table artifact."""
        return [
            ("budget period", f"{self.period_start.isoformat()} to {self.period_end.isoformat()}"),
            ("budget hours used this period", self.used_hours),
            ("budget monthly limit hours", self.limit_hours),
            ("budget hours used by this run", self.run_hours),
            (f"budget runs out at the last {PACE_DAYS} days' pace", self.run_out_text()),
        ]

    def run_out_text(self) -> str:
        """The run-out day, or why there is none."""
        if self.run_out is None and self.pace_hours_per_day <= 0:
            return f"never: no use in the last {PACE_DAYS} days"
        if self.run_out is None:
            return f"not within {FORECAST_HORIZON_DAYS // 365} years"
        if self.run_out >= self.period_end:
            return f"{self.run_out.isoformat()} (after the reset on {self.period_end.isoformat()})"
        return self.run_out.isoformat()


class BudgetGate:
    """One run's spending of one org+model's audio hours in the current billing period."""

    def __init__(
        self, *, org: str, model: str, book: BudgetBook, period: BillingPeriod, now: datetime,
        margin: float, pace_before_ms: int, daily_before_ms: dict[date, int],
    ) -> None:
        self.org, self.model, self.book, self.period, self.now = org, model, book, period, now
        self.margin = margin
        self._pace_before_ms = pace_before_ms
        self._daily_before_ms = daily_before_ms
        self._emitted: set[str] = set()
        # Why the run stopped sending: files are offered in the run's order, and once one
        # does not fit the rest wait too (and are not read from S3 to find out).
        self.closed: str | None = None
        # Files offered and not yet decided, in offer order: their size estimates, and the
        # task processing each (one cancelled with its chunk never comes to decide).
        self._line: dict[str, tuple[int, asyncio.Task[Any] | None]] = {}
        self._decided = asyncio.Event()

    def refusal(self, obj: AudioObject) -> str | None:
        """Before the file is read: why no more files are sent, or None (the file then
        takes its place in line, and must come to `reserve` or `settle`)."""
        if self.closed is None and self.book.spendable_ms <= 0:
            self._close(f"{self._figures()}; nothing is left to spend")
        if self.closed is None:
            estimate = self.book.estimate_ms(obj.size, _extension(obj))
            self._line[obj.file_id] = (estimate, asyncio.current_task())
        return self.closed

    async def reserve(self, obj: AudioObject, audio: bytes | None) -> str | None:
        """Hold the file's estimated cost before its call; the reason with figures if it
        does not fit (then it is not sent, and neither is any file after it).

        Files read concurrently come here out of order; one waits for the files offered
        before it unless what is left covers them too, so the budget goes in the run's order.
        """
        extension = _extension(obj)
        from_header = wav_duration_ms(audio) if audio else None
        estimate = from_header or self.book.estimate_ms(obj.size, extension)
        deadline = asyncio.get_running_loop().time() + ORDER_WAIT_SECONDS
        while not self.closed and not self._may_decide(obj.file_id, estimate):
            decided = self._decided
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                logger.warning(
                    "file %s: files offered before it were not read in %.0f s; deciding now",
                    obj.file_id, ORDER_WAIT_SECONDS,
                )
                break
            with contextlib.suppress(TimeoutError):  # not wait_for: see tasks/slots.py
                async with asyncio.timeout(left):
                    await decided.wait()
        self._leave_line(obj.file_id)
        if self.closed:
            return self.closed
        if self.book.reserve(obj.file_id, estimate):
            return None
        how = "from its WAV header" if from_header else f"from its size as .{extension or '?'}"
        return self._close(f"it needs ~{_hours(estimate)} h ({how}); {self._figures()}")

    def settle(self, obj: AudioObject, status: str, duration_ms: int | None) -> None:
        """End the file's hold: a completed file is charged its real duration (its estimate
        when the service gave none); any other outcome is charged nothing."""
        self._leave_line(obj.file_id)
        held = self.book.held_ms(obj.file_id)
        if held is None:
            return
        before = self.book.used_ms
        charged = (duration_ms or held) if status == "completed" else None
        self.book.settle(
            obj.file_id, charged, size_bytes=obj.size if duration_ms else 0,
            extension=_extension(obj),
        )
        self._crossed(before, self.book.used_ms)

    def report(self) -> BudgetReport:
        """The period's figures now, this run's spend included."""
        book = self.book
        pace_ms = self._pace_before_ms + book.spent_ms
        return BudgetReport(
            model=self.model,
            period_start=self.period.start.date(),
            period_end=self.period.end.date(),
            limit_hours=_hours(book.limit_ms),
            used_hours=_hours(book.used_ms),
            run_hours=_hours(book.spent_ms),
            margin_hours=_hours(book.margin_ms),
            pace_hours_per_day=_hours(pace_ms / PACE_DAYS),
            run_out=run_out_date(
                used_ms=book.used_ms, limit_ms=book.limit_ms, pace_ms=pace_ms, now=self.now
            ),
            daily_hours={day: _hours(ms) for day, ms in sorted(self._daily_before_ms.items())},
        )

    def _may_decide(self, file_id: str, estimate_ms: int) -> bool:
        """First in line, or what is left covers this file and every file before it."""
        ahead = 0
        for waiting, (size_estimate, task) in self._line.items():
            if waiting == file_id:
                break
            if task is None or not task.done():
                ahead += size_estimate
        return ahead == 0 or self.book.spendable_ms - estimate_ms >= ahead

    def _leave_line(self, file_id: str) -> None:
        if self._line.pop(file_id, None) is not None:
            self._decided.set()  # wake the files waiting behind it
            self._decided = asyncio.Event()

    def _figures(self) -> str:
        book = self.book
        in_flight = book.limit_ms - book.margin_ms - book.used_ms - book.spendable_ms
        return (
            f"{self.model} budget: {_hours(max(book.spendable_ms, 0))} h left to spend of "
            f"{_hours(book.limit_ms)} h for the period {self.period.start.date()} to "
            f"{self.period.end.date()} ({_hours(book.used_ms)} h used, "
            f"{_hours(in_flight)} h held by calls in flight, "
            f"{_hours(book.margin_ms)} h kept as a {self.margin:.0%} margin)"
        )

    def _close(self, reason: str) -> str:
        self.closed = (
            f"{reason}. Deferred to the next period (from {self.period.end.date()}) or a "
            "raised monthly_audio_hours in the Org Limits block"
        )
        logger.info("%s %s: stopped sending, %s", self.org, self.model, reason)
        self._emit(EVENT_EXHAUSTED, reason)
        return self.closed

    def _crossed(self, before_ms: int, after_ms: int) -> None:
        limit = self.book.limit_ms
        if before_ms < WARNING_FRACTION * limit <= after_ms:
            self._emit(EVENT_WARNING, f"{self.model} used {WARNING_FRACTION:.0%} of its limit")
        if before_ms < limit <= after_ms:
            self._emit(EVENT_EXHAUSTED, f"{self.model} used its whole limit")

    def _emit(self, event: str, reason: str) -> None:
        if event in self._emitted:
            return
        self._emitted.add(event)
        report = self.report()
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"modulate.budget.{self.org}.{self.model}",
                "prefect.resource.name": f"{self.org} {self.model} monthly audio hours",
                "modulate.org": self.org,
                "modulate.model": self.model,
            },
            payload={
                "reason": reason,
                "threshold_percent": 100 if event == EVENT_EXHAUSTED else 80,
                **report.model_dump(mode="json", exclude={"daily_hours"}),
            },
        )


async def open_budget(
    limits: OrgLimits, model: str, location: OutputLocation, *, now: datetime | None = None
) -> BudgetGate:
    """Read the period's usage of `model` and open the run's gate.

    Args:
        limits: The Org Limits block: the model's monthly hours, start day and margin.
        model: The billed model.
        location: The dataset root holding the usage table.
        now: The time the period and the forecast are computed at (naive is UTC); the
            current time if None.
    """
    now = now or datetime.now(UTC)
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    period = billing_period(now, limits.billing_period_start_day)
    pace_days = {now.date() - timedelta(days=n) for n in range(PACE_DAYS)}
    period_days = {day for day in period.days() if day <= now.date()}
    daily = await asyncio.to_thread(_read_days, location, model, period_days | pace_days)
    limit_ms = round(limits.for_model(model).monthly_audio_hours * MS_PER_HOUR)
    book = BudgetBook(
        limit_ms=limit_ms,
        used_before_ms=sum(ms for day, ms in daily.items() if day in period_days),
        margin_ms=round(limits.budget_margin * limit_ms),
    )
    return BudgetGate(
        org=limits.organization, model=model, book=book, period=period, now=now,
        margin=limits.budget_margin,
        pace_before_ms=sum(ms for day, ms in daily.items() if day in pace_days),
        daily_before_ms={day: ms for day, ms in daily.items() if day in period_days},
    )


async def usage_report(
    limits: OrgLimits, model: str, location: OutputLocation, *, now: datetime | None = None
) -> BudgetReport:
    """One model's period figures from the usage table, outside any run."""
    return (await open_budget(limits, model, location, now=now)).report()


def _read_days(location: OutputLocation, model: str, days: Iterable[date]) -> dict[date, int]:
    """Each day's usage, the day partitions listed in parallel (on S3 each is a round trip)."""
    ordered = sorted(days)
    with ThreadPoolExecutor(USAGE_LISTING_THREADS) as pool:
        parts = pool.map(lambda day: read_daily_usage(location, model, [day]), ordered)
        return {day: ms for part in parts for day, ms in part.items()}


def _extension(obj: AudioObject) -> str:
    return obj.filename.rsplit(".", 1)[-1].lower() if "." in obj.filename else ""


def _hours(ms: float) -> float:
    return round(ms / MS_PER_HOUR, HOURS_DIGITS)
