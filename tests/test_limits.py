"""decide() and QuotaBreaker with the zero-wait policy: no sleeps, no network."""

from __future__ import annotations

import email.utils
import random

import pytest

from modulate import errors
from modulate.limits import (
    GiveUp,
    QuotaBreaker,
    Retry,
    RetryPolicy,
    RetryRecord,
    decide,
    parse_retry_after,
)

POLICY = RetryPolicy()
ZERO = RetryPolicy.for_tests()


def busy(retry_after: float | None = None, suspect: bool = False) -> errors.ConcurrencyLimited:
    return errors.ConcurrencyLimited(
        "stt: busy", endpoint="stt", status=429, retry_after=retry_after, quota_suspect=suspect
    )


def transient(retry_after: float | None = None) -> errors.Transient:
    return errors.Transient("stt: 503", endpoint="stt", status=503, retry_after=retry_after)


class FixedRng:
    """uniform() returns the low end plus a fixed fraction of the range."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


def test_policy_defaults() -> None:
    assert (POLICY.max_attempts, POLICY.max_total_s) == (6, 120)
    assert (POLICY.initial, POLICY.base) == (0.5, 2)
    assert (POLICY.cap, POLICY.jitter, POLICY.concurrency_wait) == (30, 1.0, (1.0, 3.0))
    assert POLICY.retry_after_cap == 120


def test_for_tests_keeps_decisions_but_waits_zero() -> None:
    rng = random.Random(1)
    for attempt in range(1, 6):
        assert decide(ZERO, transient(), attempt, 0.0, rng) == Retry(0.0)
    assert isinstance(decide(ZERO, transient(), 6, 0.0, rng), GiveUp)
    assert decide(ZERO, busy(), 100, 0.0, rng) == Retry(0.0)
    assert decide(ZERO, busy(retry_after=5), 1, 0.0, rng) == Retry(0.0)


@pytest.mark.parametrize(
    ("attempt", "fraction", "wait"),
    [(1, 0.0, 0.5), (2, 0.0, 1.0), (3, 0.5, 2.5), (4, 1.0, 5.0), (5, 0.0, 8.0)],
)
def test_transient_backoff(attempt: int, fraction: float, wait: float) -> None:
    assert decide(POLICY, transient(), attempt, 0.0, FixedRng(fraction)) == Retry(wait)


def test_transient_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=20, max_total_s=10_000)
    assert decide(policy, transient(), 10, 0.0, FixedRng(1.0)) == Retry(30.0)


def test_transient_gives_up_after_max_attempts() -> None:
    assert isinstance(decide(POLICY, transient(), 6, 0.0, FixedRng(0)), GiveUp)
    assert isinstance(decide(POLICY, transient(), 5, 0.0, FixedRng(0)), Retry)


def test_transient_gives_up_when_total_time_is_spent() -> None:
    assert isinstance(decide(POLICY, transient(), 2, 119.5, FixedRng(0)), GiveUp)
    assert isinstance(decide(POLICY, transient(), 2, 100.0, FixedRng(0)), Retry)


def test_transient_honours_a_longer_retry_after() -> None:
    assert decide(POLICY, transient(retry_after=7), 1, 0.0, FixedRng(0)) == Retry(7.0)


def test_concurrency_always_retries_and_never_counts() -> None:
    rng = FixedRng(0.5)
    for attempt in (0, 1, 6, 100):
        assert decide(POLICY, busy(), attempt, 10_000.0, rng) == Retry(2.0)


def test_concurrency_uses_retry_after() -> None:
    assert decide(POLICY, busy(retry_after=1), 1, 0.0, FixedRng(0.9)) == Retry(1.0)


def test_concurrency_gives_up_above_retry_after_cap() -> None:
    assert isinstance(decide(POLICY, busy(retry_after=3600), 1, 0.0, FixedRng(0)), GiveUp)


def test_concurrency_wait_is_jittered_within_range() -> None:
    rng = random.Random(7)
    waits = {decide(POLICY, busy(), 1, 0.0, rng).wait for _ in range(50)}  # type: ignore[union-attr]
    assert all(1.0 <= w <= 3.0 for w in waits) and len(waits) > 10


@pytest.mark.parametrize(
    "error",
    [
        errors.MonthlyLimitReached("x", endpoint="stt"),
        errors.AuthError("x", endpoint="stt"),
        errors.ModelNotEnabled("x", endpoint="stt"),
        errors.BadInput("x", endpoint="stt"),
    ],
)
def test_permanent_classes_give_up(error: errors.ModulateError) -> None:
    assert isinstance(decide(POLICY, error, 1, 0.0, FixedRng(0)), GiveUp)


def test_open_breaker_stops_every_retry() -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=5)
    breaker.record_rejection(errors.MonthlyLimitReached("x", endpoint="stt"))
    assert isinstance(decide(ZERO, busy(), 1, 0.0, breaker=breaker), GiveUp)
    assert isinstance(decide(ZERO, transient(), 1, 0.0, breaker=breaker), GiveUp)


def test_retry_record() -> None:
    record = RetryRecord.of(transient(), 2, 1.5)
    assert record == RetryRecord("Transient", 2, 1.5)
    with pytest.raises(AttributeError):
        record.wait = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", 1.0), ("2.5", 2.5), (" 3 ", 3.0), ("0", 0.0), (None, None), ("", None),
     ("soon", None), ("-1", None), ("nan", None), ("inf", None)],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_parse_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    assert parse_retry_after(email.utils.formatdate(now + 10, usegmt=True), now=now) == 10.0
    assert parse_retry_after(email.utils.formatdate(now - 10, usegmt=True), now=now) == 0.0


# --- QuotaBreaker ------------------------------------------------------------------------------


def suspect() -> errors.ConcurrencyLimited:
    return busy(suspect=True)


def test_breaker_threshold_is_min_of_limit_and_three() -> None:
    assert QuotaBreaker(model="stt", concurrent_limit=1).threshold == 1
    assert QuotaBreaker(model="stt", concurrent_limit=2).threshold == 2
    assert QuotaBreaker(model="stt", concurrent_limit=25).threshold == 3
    with pytest.raises(ValueError):
        QuotaBreaker(model="stt", concurrent_limit=0)


def test_explicit_monthly_opens_at_once() -> None:
    breaker = QuotaBreaker(org="demo", model="stt", concurrent_limit=25)
    breaker.record_success()
    breaker.record_rejection(errors.MonthlyLimitReached("x", endpoint="stt"))
    assert breaker.open and breaker.reason and "monthly" in breaker.reason
    assert breaker.likely_cause == "the monthly usage limit for this model is reached"


def test_suspect_rejections_in_a_row_open_it() -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=25)
    breaker.record_success()
    breaker.record_rejection(suspect())
    assert breaker.suspect and not breaker.open and not breaker.may_send_new
    breaker.record_rejection(suspect())
    assert not breaker.open
    breaker.record_rejection(suspect())
    assert breaker.open
    assert "probably" in (breaker.likely_cause or "")


def test_a_success_resets_the_count() -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=25)
    breaker.record_rejection(suspect())
    breaker.record_rejection(suspect())
    breaker.record_success()
    assert not breaker.suspect and breaker.may_send_new and breaker.likely_cause is None
    breaker.record_rejection(suspect())
    breaker.record_rejection(suspect())
    assert not breaker.open


def test_plain_concurrency_clears_suspect_but_keeps_count() -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=3)
    breaker.record_rejection(suspect())
    breaker.record_rejection(suspect())
    breaker.record_rejection(busy())
    assert not breaker.suspect and not breaker.open
    breaker.record_rejection(suspect())
    assert breaker.open


@pytest.mark.parametrize(
    "error",
    [transient(), errors.BadInput("x", endpoint="stt"), errors.AuthError("x", endpoint="stt")],
)
def test_other_errors_do_not_move_it(error: errors.ModulateError) -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=1)
    breaker.record_rejection(error)
    assert not breaker.open and not breaker.suspect


def test_limit_one_opens_on_first_suspect() -> None:
    breaker = QuotaBreaker(model="svd", concurrent_limit=1)
    breaker.record_rejection(suspect())
    assert breaker.open


def test_never_succeeded_and_all_ambiguous_names_every_cause() -> None:
    breaker = QuotaBreaker(model="svd", concurrent_limit=2)
    for _ in range(2):
        breaker.record_rejection(
            errors.classify(endpoint="svd", status=403, detail="This request is not permitted.")
        )
    assert breaker.open
    cause = breaker.likely_cause or ""
    assert "API key" in cause and "access" in cause and "monthly" in cause


def test_open_stays_open() -> None:
    breaker = QuotaBreaker(model="stt", concurrent_limit=1)
    breaker.record_rejection(suspect())
    reason = breaker.reason
    breaker.record_success()
    assert breaker.open and breaker.reason == reason


def test_calls_after_first_quota_error_are_bounded_by_the_limit() -> None:
    """Simulate: limit C, quota exhausted; callers only re-probe while suspect."""
    limit = 5
    breaker = QuotaBreaker(model="stt", concurrent_limit=limit)
    in_flight = limit  # C calls already on the wire when the quota runs out
    calls_after_first = 0
    queue = 100
    while in_flight and not breaker.open:
        breaker.record_rejection(suspect())  # each in-flight call comes back rejected
        in_flight -= 1
        calls_after_first += 1
        decision = decide(ZERO, suspect(), 1, 0.0, breaker=breaker)
        if isinstance(decision, Retry):
            in_flight += 1  # the rejected file is re-probed
        if breaker.may_send_new and queue:
            queue -= 1
            in_flight += 1
    assert breaker.open and calls_after_first <= limit and queue == 100
