"""The retry policy and the one retry loop every call to the service goes through.

Pure and Prefect-free. `decide()` turns (policy, error class, attempts, time) into a wait or a
give-up; `call_with_retries()` runs one call under a slot and the run's `ModelGate`
(modulate/gate.py: the evidence about the org+model's limits), retrying what the class says
may pass. Batch calls, streams and Platform uploads all use it.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, TypeVar

from ._retry_after import parse_retry_after
from .errors import AuthError, ConcurrencyLimited, ModulateError, Transient
from .gate import ModelGate, Ticket

__all__ = [
    "Deferred",
    "GiveUp",
    "Retry",
    "RetryPolicy",
    "RetryRecord",
    "call_with_retries",
    "decide",
    "mark_admitted",
    "parse_retry_after",
]

_T = TypeVar("_T")


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
    # A file that has waited this long in all for "too many at once" is deferred, not failed:
    # a counter stuck on the service's side must not keep a run (and its slots) alive forever.
    concurrency_budget_s: float = 900.0
    # Ambiguous refusals with none of our calls in flight must persist this long before the
    # monthly breaker opens (see modulate/gate.py, rule 4).
    quota_evidence_s: float = 30.0
    retry_after_cap: float = 120.0
    time_scale: float = 1.0  # every wait is multiplied by this; 0.0 in tests

    @classmethod
    def for_tests(cls, **overrides: object) -> RetryPolicy:
        """The same decisions with every wait zero, so tests never sleep."""
        return replace(cls(time_scale=0.0), **overrides)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Retry:
    """Retry after `wait` seconds (scaled); `charged` is the unscaled wait it counts for."""

    wait: float
    charged: float = field(default=0.0, compare=False)


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


class Deferred(Exception):
    """The call was not made (or not retried) and the file waits for a later run.

    `kind` is "quota" (the monthly breaker is open) or "concurrency" (the service kept
    refusing "too many at once" past the policy's budget).
    """

    def __init__(self, kind: Literal["quota", "concurrency"], reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def decide(
    policy: RetryPolicy,
    error: ModulateError,
    attempt: int,
    elapsed: float,
    rng: _Uniform | None = None,
    *,
    waited: float = 0.0,
    at_least: float = 0.0,
) -> Retry | GiveUp:
    """Whether and how long to wait before the next attempt after `error`.

    Args:
        attempt: transient attempts made so far for this file (1 after the first failure);
            ConcurrencyLimited rejections must not be counted in it.
        elapsed: seconds since the first attempt for this file.
        rng: source of jitter (`random.Random`); the module's generator when None.
        waited: unscaled seconds this file already waited out concurrency refusals.
        at_least: the shortest wait for a concurrency refusal (the gate's probe spacing).
    """
    rng = rng if rng is not None else random
    if isinstance(error, ConcurrencyLimited):
        if error.retry_after is not None and error.retry_after > policy.retry_after_cap:
            return GiveUp(f"Retry-After {error.retry_after:.0f}s exceeds the cap")
        low, high = policy.concurrency_wait
        wait = error.retry_after if error.retry_after is not None else rng.uniform(low, high)
        # Never sooner than the shortest wait: a Retry-After of 0 (or a date already past)
        # would re-send at once, with nothing charged to the budget, for as long as it lasts.
        wait = max(wait, low, at_least)
        if waited + wait > policy.concurrency_budget_s:
            minutes = policy.concurrency_budget_s / 60
            return GiveUp(f"the service kept refusing for concurrency for {minutes:.3g} min")
        return Retry(wait * policy.time_scale, charged=wait)
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
        return Retry(wait * policy.time_scale, charged=wait)
    return GiveUp(f"{type(error).__name__} is not retried")


# The attempt in progress, so a stream can say "admitted" at its first server message
# without every job's call signature carrying the gate.
_attempt: contextvars.ContextVar[tuple[ModelGate, Ticket, list[bool]] | None] = (
    contextvars.ContextVar("modulate_attempt", default=None)
)


def mark_admitted() -> None:
    """Tell the gate the call in progress was accepted (a stream's first server message).

    A stream is counted a success when the service first answers, not when it ends: a long
    stream must not leave the gate doubting the service for its whole length.
    """
    attempt = _attempt.get()
    if attempt is not None and not attempt[2]:
        gate, ticket, seen = attempt
        seen.append(True)
        gate.admitted(ticket)


async def call_with_retries(
    send: Callable[[], Awaitable[_T]],
    *,
    gate: ModelGate,
    policy: RetryPolicy,
    slot: Callable[[], AbstractAsyncContextManager[None]],
    rng: _Uniform | None = None,
    on_attempt: Callable[[], None] | None = None,
    on_refusal: Callable[[ModulateError], None] | None = None,
) -> _T:
    """Send one call under a slot and the gate, retrying what may pass; the one retry loop.

    Waits hold no slot. Raises the call's ModulateError when it will not pass (bad input,
    transient past its budget), `AuthError` when the gate's verdict is "access", and
    `Deferred` when the breaker is open or the concurrency budget is spent.
    """
    started = time.monotonic()
    transient = 0
    waited = 0.0
    retry = False
    while True:
        async with gate.permit(retry=retry) as permit:
            if gate.open:
                raise _stopped(gate, None)
            async with slot():
                if not gate.may_send(permit):
                    continue  # the gate turned suspect while this call waited for its slot
                if on_attempt is not None:
                    on_attempt()
                ticket = gate.sent()
                token = _attempt.set((gate, ticket, []))
                try:
                    result = await send()
                except ModulateError as exc:
                    error = exc
                    gate.refused(ticket, error)
                else:
                    mark_admitted()
                    return result
                finally:
                    _attempt.reset(token)
                    gate.finished(ticket)
        if on_refusal is not None:
            on_refusal(error)
        if isinstance(error, AuthError):
            raise error
        if gate.open:
            raise _stopped(gate, error)
        retry = True
        if not isinstance(error, ConcurrencyLimited):
            transient += 1
        decision = decide(
            policy, error, transient, time.monotonic() - started, rng,
            waited=waited, at_least=gate.probe_spacing(policy.quota_evidence_s),
        )
        if isinstance(decision, GiveUp):
            if isinstance(error, ConcurrencyLimited):
                raise Deferred("concurrency", decision.reason) from None
            raise error
        if isinstance(error, ConcurrencyLimited):
            waited += decision.charged
        await asyncio.sleep(decision.wait)


def _stopped(gate: ModelGate, error: ModulateError | None) -> Exception:
    if gate.verdict == "access":
        return AuthError(
            gate.reason or f"{gate.model}: access refused",
            endpoint=error.endpoint if error is not None else gate.model,
            status=error.status if error is not None else None,
            close_code=error.close_code if error is not None else None,
            detail=error.detail if error is not None else None,
        )
    return Deferred("quota", gate.likely_cause or "the monthly usage limit is reached")
