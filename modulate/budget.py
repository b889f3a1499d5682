"""The arithmetic of a monthly audio-hours budget: billing periods, estimates, forecasts.

`BudgetBook` is the one place that decides whether a file fits: what the period had used
before the run, what this run spent (real durations), what its calls in flight hold
(estimates), against the limit minus a safety margin. Pure values and functions: no I/O,
no Prefect (tasks/budget.py does the reading, the events and the reporting).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "DEFAULT_BYTES_PER_SECOND",
    "FORECAST_HORIZON_DAYS",
    "MS_PER_HOUR",
    "PACE_DAYS",
    "BillingPeriod",
    "BudgetBook",
    "billing_period",
    "run_out_date",
]

MS_PER_HOUR = 3_600_000
PACE_DAYS = 7  # the forecast's pace: audio hours per day over this many days up to now
FORECAST_HORIZON_DAYS = 3653  # ten years: a later run-out date is reported as none
MAX_START_DAY = 28  # every month has this day, so a period never starts on a missing date
# Audio bytes per second assumed for a file whose header was not read or not understood,
# by extension: typical speech encodings (128 kbit/s MP3/AAC, 64 kbit/s Opus/Vorbis, 16 kHz
# 16-bit mono for uncompressed). A run replaces them with what its completed files of the
# same extension measured (bytes over real duration), so only its first files rely on them.
DEFAULT_BYTES_PER_SECOND: dict[str, float] = {
    "mp3": 16_000.0, "aac": 16_000.0, "m4a": 16_000.0, "mp4": 16_000.0, "mov": 16_000.0,
    "wma": 16_000.0, "ogg": 8_000.0, "opus": 8_000.0, "webm": 8_000.0, "3gp": 4_000.0,
    "3gpp": 4_000.0, "amr": 1_600.0, "flac": 20_000.0, "wav": 32_000.0, "aiff": 32_000.0,
    "au": 16_000.0,
}
FALLBACK_BYTES_PER_SECOND = 16_000.0  # an extension missing above


@dataclass(frozen=True)
class BillingPeriod:
    """One billing period, [start, end) in UTC."""

    start: datetime
    end: datetime

    def days(self) -> list[date]:
        """Every UTC day of the period, in order."""
        first, last = self.start.date(), (self.end - timedelta(microseconds=1)).date()
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def billing_period(now: datetime, start_day: int = 1) -> BillingPeriod:
    """The billing period holding `now`: from `start_day` of one month to that of the next.

    Args:
        now: Any aware time (naive is taken as UTC).
        start_day: Day of the month periods start on, 1 to 28 (1 = calendar months).
    """
    if not 1 <= start_day <= MAX_START_DAY:
        raise ValueError(f"start_day must be 1 to {MAX_START_DAY}, got {start_day}")
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    year, month = now.year, now.month
    if now.day < start_day:
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    start = datetime(year, month, start_day, tzinfo=UTC)
    end_year, end_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return BillingPeriod(start, datetime(end_year, end_month, start_day, tzinfo=UTC))


def run_out_date(
    *, used_ms: int, limit_ms: int, pace_ms: int, now: datetime, pace_days: int = PACE_DAYS
) -> date | None:
    """The day the limit is reached if usage goes on at the pace of the last `pace_days` days.

    Args:
        used_ms: Audio used in the period so far.
        limit_ms: The period's limit.
        pace_ms: Audio used in the last `pace_days` days (which may reach into the last period).
        now: The time the forecast is made at.

    Returns:
        Today when the limit is already reached; None when nothing was used in those days,
        or when the day is more than `FORECAST_HORIZON_DAYS` away.
    """
    if used_ms >= limit_ms:
        return now.date()
    if pace_ms <= 0:
        return None
    days_left = (limit_ms - used_ms) / (pace_ms / pace_days)
    if days_left > FORECAST_HORIZON_DAYS:
        return None
    return (now + timedelta(days=days_left)).date()


class BudgetBook:
    """What one run may still spend of one model's period, decided one file at a time.

    A file fits when the period's use before the run, this run's real spend, the estimates
    of the calls in flight and its own estimate stay within the limit minus the margin.
    Callers on one event loop call `reserve` and `settle` without awaiting in between, which
    makes each decision atomic.
    """

    def __init__(self, *, limit_ms: int, used_before_ms: int, margin_ms: int) -> None:
        self.limit_ms = limit_ms
        self.used_before_ms = used_before_ms
        self.margin_ms = margin_ms
        self.spent_ms = 0
        self._held: dict[str, int] = {}
        self._measured: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])  # bytes, ms

    @property
    def used_ms(self) -> int:
        """The period's use so far: before the run plus this run's completed files."""
        return self.used_before_ms + self.spent_ms

    @property
    def spendable_ms(self) -> int:
        """What new calls may still take: the limit less the margin, the use and the holds."""
        return self.limit_ms - self.margin_ms - self.used_ms - sum(self._held.values())

    def estimate_ms(self, size_bytes: int, extension: str) -> int:
        """A file's duration from its size, at the bytes per second measured for its
        extension by this run's completed files, else the default for the extension."""
        measured_bytes, measured_ms = self._measured[extension]
        if measured_bytes and measured_ms:
            bytes_per_ms = measured_bytes / measured_ms
        else:
            bytes_per_ms = DEFAULT_BYTES_PER_SECOND.get(extension, FALLBACK_BYTES_PER_SECOND) / 1000
        return max(1, round(size_bytes / bytes_per_ms))

    def reserve(self, file_id: str, estimate_ms: int) -> bool:
        """Hold `estimate_ms` for a file about to be sent; False (nothing held) if it does
        not fit."""
        if estimate_ms > self.spendable_ms:
            return False
        self._held[file_id] = estimate_ms
        return True

    def settle(
        self, file_id: str, charged_ms: int | None, *, size_bytes: int = 0, extension: str = ""
    ) -> None:
        """End a file's hold: `charged_ms` is what its call cost (None: nothing was charged).

        A real duration also teaches the size estimate of its extension.
        """
        held = self._held.pop(file_id, None)
        if held is None or charged_ms is None:
            return
        self.spent_ms += charged_ms
        if size_bytes and extension:
            measured = self._measured[extension]
            measured[0] += size_bytes
            measured[1] += charged_ms

    def held_ms(self, file_id: str) -> int | None:
        """The estimate held for a file in flight, if any."""
        return self._held.get(file_id)
