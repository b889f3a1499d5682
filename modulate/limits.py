"""Retry policy and quota breaker: what to wait after a classified error, and when to stop.

Pure and Prefect-free. `decide()` turns (policy, error class, attempt, elapsed) into a wait or a
give-up; `QuotaBreaker` collects evidence per org+model that the monthly limit is reached.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Protocol

from ._retry_after import parse_retry_after
from .errors import ConcurrencyLimited, ModulateError, MonthlyLimitReached, Transient

__all__ = [
    "GiveUp",
    "QuotaBreaker",
    "Retry",
    "RetryPolicy",
    "RetryRecord",
    "decide",
    "parse_retry_after",
]

BREAKER_MAX_THRESHOLD = 3


class _Uniform(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait between attempts and when to stop; a frozen value passed in.

    Transient backoff (keep in sync with `decide()`):
    `min(cap, initial * base ** (n - 1) + U(0, jitter))` for transient attempt n.
    """

    max_attempts: int = 6
    max_total_s: float = 120.0
    initial: float = 0.5
    base: float = 2.0
    cap: float = 30.0
    jitter: float = 1.0
    concurrency_wait: tuple[float, float] = (1.0, 3.0)
    retry_after_cap: float = 120.0
    time_scale: float = 1.0  # every wait is multiplied by this; 0.0 in tests

    @classmethod
    def for_tests(cls, **overrides: object) -> RetryPolicy:
        """The same decisions with every wait zero, so tests never sleep."""
        return replace(cls(time_scale=0.0), **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Retry:
    """Retry after `wait` seconds."""

    wait: float


@dataclass(frozen=True)
class GiveUp:
    """Do not retry; `reason` says why (log-safe)."""

    reason: str


@dataclass(frozen=True)
class RetryRecord:
    """One retry for logs and artifacts: error class name, attempt, wait; never call arguments."""

    error: str
    attempt: int
    wait: float

    @classmethod
    def of(cls, error: BaseException, attempt: int, wait: float) -> RetryRecord:
        return cls(type(error).__name__, attempt, wait)


def decide(
    policy: RetryPolicy,
    error: ModulateError,
    attempt: int,
    elapsed: float,
    rng: _Uniform | None = None,
    *,
    breaker: QuotaBreaker | None = None,
) -> Retry | GiveUp:
    """Whether and how long to wait before the next attempt after `error`.

    Args:
        attempt: transient attempts made so far for this file (1 after the first failure);
            ConcurrencyLimited rejections must not be counted in it.
        elapsed: seconds since the first attempt for this file.
        rng: source of jitter (`random.Random`); the module's generator when None.
        breaker: the org+model breaker; when open nothing is retried.
    """
    rng = rng if rng is not None else random
    if breaker is not None and breaker.open:
        return GiveUp(f"quota breaker open: {breaker.reason}")
    if isinstance(error, ConcurrencyLimited):
        if error.retry_after is not None:
            if error.retry_after > policy.retry_after_cap:
                return GiveUp(f"Retry-After {error.retry_after:.0f}s exceeds the cap")
            return Retry(error.retry_after * policy.time_scale)
        low, high = policy.concurrency_wait
        return Retry(rng.uniform(low, high) * policy.time_scale)
    if isinstance(error, Transient):
        if attempt >= policy.max_attempts:
            return GiveUp(f"{attempt} transient attempts (max {policy.max_attempts})")
        # keep in sync with the RetryPolicy docstring
        wait = min(policy.cap, policy.initial * policy.base ** (attempt - 1))
        wait = min(policy.cap, wait + rng.uniform(0.0, policy.jitter))
        if error.retry_after is not None and error.retry_after <= policy.retry_after_cap:
            wait = max(wait, error.retry_after)
        if elapsed + wait > policy.max_total_s:
            return GiveUp(f"retry budget of {policy.max_total_s:.0f}s spent")
        return Retry(wait * policy.time_scale)
    return GiveUp(f"{type(error).__name__} is not retried")


class QuotaBreaker:
    """Evidence, per org+model, that the monthly limit is reached.

    Rules:
    - an explicit MonthlyLimitReached opens it at once;
    - `threshold` (= min(concurrent_limit, 3)) quota-suspect rejections with no success in
      between open it;
    - a success resets the count and clears `suspect`;
    - `suspect` (the last outcome was a quota-suspect rejection): send no NEW files, only re-probe
      with the rejected one, so at most `concurrent_limit` calls meet the quota after the first;
    - open: never retry; the caller defers every unsent file.
    """

    def __init__(self, *, model: str, concurrent_limit: int, org: str | None = None) -> None:
        if concurrent_limit < 1:
            raise ValueError("concurrent_limit must be at least 1")
        self.org = org
        self.model = model
        self.threshold = min(concurrent_limit, BREAKER_MAX_THRESHOLD)
        self.open = False
        self.suspect = False
        self.reason: str | None = None
        self._consecutive = 0
        self._succeeded = False
        self._explicit = False

    @property
    def may_send_new(self) -> bool:
        """True when new files may be sent (neither open nor suspect)."""
        return not (self.open or self.suspect)

    def record_success(self) -> None:
        self._succeeded = True
        self._consecutive = 0
        self.suspect = False

    def record_rejection(self, error: ModulateError) -> None:
        """Count a failed call; only limit errors change the breaker."""
        if isinstance(error, MonthlyLimitReached):
            self._explicit = True
            self.suspect = True
            self._trip(f"{self.model}: monthly usage limit reached")
        elif isinstance(error, ConcurrencyLimited) and error.quota_suspect:
            self._consecutive += 1
            self.suspect = True
            if self._consecutive >= self.threshold:
                self._trip(
                    f"{self.model}: {self._consecutive} quota-suspect rejections in a row"
                    " without a success"
                )
        elif isinstance(error, ConcurrencyLimited):
            self.suspect = False  # the service says "too many at once", not "quota"

    @property
    def likely_cause(self) -> str | None:
        """A human explanation once the breaker is open or suspect, else None."""
        if not (self.open or self.suspect):
            return None
        if self._explicit:
            return "the monthly usage limit for this model is reached"
        if not self._succeeded:
            return (
                f"no call to {self.model} has succeeded yet and every rejection was ambiguous:"
                " the cause may be the API key, the model's access for this organisation,"
                " or the monthly usage limit"
            )
        return "the monthly usage limit (credits) for this model is probably used up"

    def _trip(self, reason: str) -> None:
        self.open = True
        if self.reason is None:
            self.reason = reason

    def __repr__(self) -> str:
        return (
            f"QuotaBreaker(model={self.model!r}, open={self.open}, suspect={self.suspect},"
            f" consecutive={self._consecutive}/{self.threshold})"
        )
