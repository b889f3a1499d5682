"""decide(), ModelGate and call_with_retries() with the zero-wait policy: no sleeps, no network.

The service in the loop tests is a few lines of asyncio standing for the vendor's admission
rule (a counter and a limit); the same cases run against the emulator in tests/test_gate_flows.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import random
from collections.abc import AsyncIterator

import pytest

from modulate import errors
from modulate.gate import ModelGate
from modulate.limits import (
    Deferred,
    GiveUp,
    Retry,
    RetryPolicy,
    RetryRecord,
    call_with_retries,
    decide,
    parse_retry_after,
)

POLICY = RetryPolicy()
ZERO = RetryPolicy.for_tests()


def busy(
    retry_after: float | None = None, suspect: bool = False, access: bool = False
) -> errors.ConcurrencyLimited:
    return errors.ConcurrencyLimited(
        "stt: busy", endpoint="stt", status=429, retry_after=retry_after, quota_suspect=suspect,
        access_suspect=access,
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
    assert (POLICY.concurrency_budget_s, POLICY.quota_evidence_s) == (900, 30)


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


def test_concurrency_never_counts_as_an_attempt() -> None:
    rng = FixedRng(0.5)
    for attempt in (0, 1, 6, 100):
        assert decide(POLICY, busy(), attempt, 10_000.0, rng) == Retry(2.0)


def test_concurrency_waits_are_bounded_by_the_budget() -> None:
    """Case 5 of issue 11: a stuck counter must not keep a file waiting forever."""
    decision = decide(POLICY, busy(), 1, 0.0, FixedRng(0.5), waited=POLICY.concurrency_budget_s - 1)
    assert isinstance(decision, GiveUp)
    assert decision.reason == "the service kept refusing for concurrency for 15 min"
    decision = decide(POLICY, busy(), 1, 0.0, FixedRng(0.5), waited=POLICY.concurrency_budget_s - 3)
    assert decision == Retry(2.0) and decision.charged == 2.0  # type: ignore[union-attr]


def test_probe_spacing_is_a_floor_on_the_wait() -> None:
    assert decide(POLICY, busy(), 1, 0.0, FixedRng(0.5), at_least=10.0) == Retry(10.0)


def test_concurrency_uses_retry_after() -> None:
    assert decide(POLICY, busy(retry_after=1), 1, 0.0, FixedRng(0.9)) == Retry(1.0)


def test_a_retry_after_of_zero_still_waits_the_shortest_concurrency_wait() -> None:
    """The headers are unknown (API_CONTRACT.md 0.4): `Retry-After: 0`, or a date already
    past, must not re-send at network speed with nothing charged to the budget."""
    decision = decide(POLICY, busy(retry_after=0), 1, 0.0, FixedRng(0.9))
    assert decision == Retry(POLICY.concurrency_wait[0])
    assert decision.charged == POLICY.concurrency_wait[0]  # type: ignore[union-attr]


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


# --- ModelGate and the one retry loop ------------------------------------------------------------


class Service:
    """The vendor's admission rule in a few lines: refuse at once over `limit` in flight, or
    once `month` calls were taken; every refusal carries the same `refusal` error."""

    def __init__(
        self, limit: int, *, month: int = 10**9, refusal: errors.ModulateError | None = None
    ) -> None:
        self.limit, self.month = limit, month
        self.refusal = refusal or busy(suspect=True)
        self.in_flight = self.max_in_flight = self.accepted = self.refused = 0
        self.first_refusal_at: int | None = None  # calls sent before the first refusal
        self.sent = 0

    async def call(self, latency: float = 0.002) -> str:
        self.sent += 1
        if self.accepted >= self.month or self.in_flight >= self.limit:
            self.refused += 1
            if self.first_refusal_at is None:
                self.first_refusal_at = self.sent
            raise self.refusal
        self.in_flight += 1
        self.accepted += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(latency)  # the call's latency, not a wait for a condition
        finally:
            self.in_flight -= 1
        return "ok"


class Slots:
    """What SlotPool does locally: at most gate.limit calls at once, first come first served."""

    def __init__(self, gate: ModelGate) -> None:
        self.gate, self.in_use = gate, 0
        self.freed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        while self.in_use >= self.gate.limit:
            self.freed.clear()
            await self.freed.wait()
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self.freed.set()


async def run_files(
    service: Service, gate: ModelGate, files: int, policy: RetryPolicy = ZERO
) -> list[object]:
    slots = Slots(gate)

    async def one() -> object:
        try:
            return await call_with_retries(
                service.call, gate=gate, policy=policy, slot=slots.slot, rng=random.Random(0)
            )
        except (Deferred, errors.ModulateError) as exc:
            return exc

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(files))), 60)


async def test_gate_learns_the_limit_the_service_enforces(caplog: pytest.LogCaptureFixture) -> None:
    """Case 1 of issue 11: the block says 10, the service takes 4 and answers every refusal with
    "Insufficient credits.": every file completes, none is deferred."""
    service = Service(4)
    gate = ModelGate(model="stt", declared=10, source="limits block 'acme'")
    results = await run_files(service, gate, 150)
    assert results == ["ok"] * 150
    assert not gate.open and gate.limit <= 5 and service.max_in_flight == 4
    assert gate.took_at_most == 4
    warnings = [r.getMessage() for r in caplog.records if "accepted at most" in r.getMessage()]
    assert warnings == [
        "limits block 'acme' says 10 for stt, the service accepted at most 4 at once: "
        "holding 4 and probing back up."
    ]


def test_the_gate_reports_a_bound_of_what_the_service_took() -> None:
    """A refused call counts every call of ours that overlapped its flight: those on the wire
    as it was sent and those sent since. A call answered just before the refusal is read
    still counts (the in-flight count alone said 3 of a service that held 4), and the
    tightest bound of the run is kept."""
    gate = ModelGate(model="stt", declared=10)
    held = [gate.sent() for _ in range(4)]  # the service holds these four
    refused = gate.sent()
    gate.finished(held[0])  # its response was read before the refusal's
    gate.refused(refused, busy())
    gate.finished(refused)
    assert gate.in_flight == 3 and gate.took_at_most == 4
    later = gate.sent()  # on the wire as the next refused call is sent
    crowded = gate.sent()
    extra = gate.sent()  # sent while it is out
    gate.refused(crowded, busy())
    assert gate.took_at_most == 4  # 3 + later + extra = 5 overlapped it: no tighter
    for call in [*held[1:], later, crowded, extra]:
        gate.finished(call)
    alone = gate.sent()
    gate.refused(alone, busy())  # none of ours overlapped it: says nothing of the limit
    assert gate.took_at_most == 4


@pytest.mark.parametrize("declared", [1, 2, 4, 10])
async def test_an_exhausted_month_stops_within_the_limit(declared: int) -> None:
    service = Service(declared, month=0)
    gate = ModelGate(model="stt", declared=declared)
    results = await run_files(service, gate, 40)
    assert all(isinstance(r, Deferred) and r.kind == "quota" for r in results)
    assert service.first_refusal_at is not None
    assert service.sent - service.first_refusal_at <= declared
    assert gate.verdict == "quota"


@pytest.mark.parametrize("declared", [2, 4, 10])
async def test_a_month_running_out_mid_run_stops_within_the_limit(declared: int) -> None:
    service = Service(declared, month=30)
    gate = ModelGate(model="stt", declared=declared)
    results = await run_files(service, gate, 200)
    assert results.count("ok") == 30
    assert all(isinstance(r, Deferred) and r.kind == "quota" for r in results if r != "ok")
    assert service.first_refusal_at is not None
    assert service.sent - service.first_refusal_at <= declared


def svd_refusal() -> errors.ModulateError:
    return errors.classify(endpoint="svd", status=403, detail="This request is not permitted.")


async def test_svd_403_with_no_success_ever_is_an_access_failure() -> None:
    """Case 2 of issue 11: a wrong key on SVD (2026 strings) stops the run, not Deferred."""
    service = Service(4, month=0, refusal=svd_refusal())
    gate = ModelGate(model="svd", declared=4)
    results = await run_files(service, gate, 20)
    assert gate.verdict == "access"
    assert all(isinstance(r, errors.AuthError) for r in results)
    assert "API key" in str(results[0]) and "not enabled" in str(results[0])


@pytest.mark.parametrize(
    ("endpoint", "status", "close_code"),
    [("stt", 403, None), ("vfast", 403, None), ("pii", 403, None),
     ("stt-streaming", None, 4003), ("pii-streaming", None, 4003)],
)
async def test_a_bare_403_or_4003_after_a_success_is_weighed_as_a_limit(
    endpoint: str, status: int | None, close_code: int | None
) -> None:
    """The vendor's page: 403 is "model access is not enabled ... or a usage limit has been
    exceeded", 4003 "Model access not enabled, or usage denied". After calls that passed,
    the model is enabled: the month is used up, and the rest is deferred, not a stopped run
    that says "not enabled"."""
    refusal = errors.classify(
        endpoint=endpoint, status=status, close_code=close_code,
        detail="This request is not permitted.",
    )
    service = Service(4, month=3, refusal=refusal)
    gate = ModelGate(model=endpoint, declared=4)
    results = await run_files(service, gate, 20)
    assert results.count("ok") == 3 and gate.verdict == "quota"
    assert all(isinstance(r, Deferred) for r in results if r != "ok")


async def test_svd_403_after_a_success_is_weighed_as_a_limit() -> None:
    service = Service(4, month=3, refusal=svd_refusal())
    gate = ModelGate(model="svd", declared=4)
    results = await run_files(service, gate, 20)
    assert results.count("ok") == 3 and gate.verdict == "quota"
    assert all(isinstance(r, Deferred) for r in results if r != "ok")


async def test_explicit_concurrency_forever_defers_after_the_budget() -> None:
    """Case 5 of issue 11: a counter stuck on the service's side ends in `Deferred`."""
    service = Service(0, refusal=busy())  # "Concurrent request limit exceeded." on every call
    gate = ModelGate(model="stt", declared=4)
    policy = RetryPolicy.for_tests(concurrency_budget_s=12.0)
    results = await run_files(service, gate, 5, policy)
    assert all(isinstance(r, Deferred) and r.kind == "concurrency" for r in results)
    assert str(results[0]) == "the service kept refusing for concurrency for 0.2 min"
    assert not gate.open
    assert service.sent <= 5 * 12  # each wait is at least 1 s of the 12 s budget


async def test_a_stream_is_admitted_at_its_first_message() -> None:
    from modulate.limits import mark_admitted

    gate = ModelGate(model="stt-streaming", declared=3)
    seen: list[bool] = []

    async def stream() -> str:
        seen.append(gate.suspect)
        if len(seen) < 3:
            raise busy(suspect=True)  # refused alone, twice: the second makes it suspect
        mark_admitted()  # the third attempt's first server message
        seen.append(gate.suspect)
        raise errors.BadInput("later", endpoint="stt-streaming")

    slots = Slots(gate)
    with pytest.raises(errors.BadInput):
        await call_with_retries(stream, gate=gate, policy=ZERO, slot=slots.slot)
    assert seen == [False, False, True, False] and gate.successes == 1


def test_explained_refusals_shrink_the_gate_and_it_probes_back_up() -> None:
    gate = ModelGate(model="stt", declared=6)
    tickets = [gate.sent() for _ in range(6)]
    for ticket in tickets[4:]:  # two refused while four of ours were in flight
        gate.refused(ticket, busy(suspect=True))
        gate.finished(ticket)
    assert gate.limit == 4 and not gate.suspect
    for ticket in tickets[:4]:
        gate.admitted(ticket)
        gate.finished(ticket)
    more = [gate.sent() for _ in range(4)]
    for ticket in more:  # a full window of successes at the limit: one more
        gate.admitted(ticket)
    assert gate.limit == 5


def test_a_burst_sent_in_doubt_is_heard_out_before_the_breaker_opens() -> None:
    """CI on a slow host: block 10, service 4, every refusal "Insufficient credits.". The
    calls sent after the first refusal went out together; three came back refused at once,
    before the one the service took could answer, and the run was deferred for the month."""
    gate = ModelGate(model="stt", declared=10)
    first = gate.sent()
    gate.refused(first, busy(suspect=True))  # the doubt starts
    gate.finished(first)
    burst = [gate.sent() for _ in range(4)]
    for ticket in burst[1:]:
        gate.refused(ticket, busy(suspect=True))
        gate.finished(ticket)
    assert not gate.open  # burst[0] is still on the wire
    gate.admitted(burst[0])
    gate.finished(burst[0])
    assert not gate.open and not gate.suspect


def test_a_burst_sent_in_doubt_all_refused_opens_the_breaker() -> None:
    gate = ModelGate(model="stt", declared=10)
    first = gate.sent()
    gate.refused(first, busy(suspect=True))
    gate.finished(first)
    burst = [gate.sent() for _ in range(4)]
    for ticket in burst:
        gate.refused(ticket, busy(suspect=True))
        gate.finished(ticket)
        assert gate.open == (ticket is burst[-1])
    assert gate.verdict == "quota"


def test_gate_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError):
        ModelGate(model="stt", declared=0)
    assert ModelGate(model="stt", declared=1).threshold == 1
    assert ModelGate(model="stt", declared=25).threshold == 3
