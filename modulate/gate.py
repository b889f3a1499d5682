"""What one run has learned about one org+model's limits: `ModelGate`.

The limits a user declares are a belief (another client may share them; a typo says 10
where the service enforces 4), and the 2026 API answers "too many at once" and "the month
is used up" with the same 429 "Insufficient credits." (and "not enabled" and "a usage
limit exceeded" with the same 403; SVD's 403 is a bad key as well). So no single refusal
decides anything; the gate weighs each one with what the run knows. The rules (keep in
sync with the README, *Limits* and *Errors and retries*):

1. Every refusal for concurrency (explicit or ambiguous) that came with fewer of our calls in
   flight than the gate allows shrinks the gate to that many (never below 1), with one
   warning when that is below the declared limit; after `limit * 2**k` successes in a row at
   the limit it probes back up by one (k = raises refused since; AIMD). That count is off
   by one or two either way (a response on its way back still counts as ours; one read
   just before the refusal no longer does). What the run reports, `took_at_most`, is a
   bound instead: every call of ours the service held when it refused was on the wire at
   some moment of the refused call's flight, so the service took at most that many (the
   tightest over the run's refusals).
2. An ambiguous refusal ("Insufficient credits.", SVD's 403) starts a *doubt*. The calls
   already on the wire knew nothing of it, so only calls sent after it count as evidence.
3. A success of a call sent in doubt ends it: the service still accepts calls, so the month
   is not used up (a burst over the real limit, or another client of the org, explains it).
4. Once a call sent in doubt is refused too, the gate is *suspect*: no new file is sent;
   one refused file at a time re-probes, spaced `probe_spacing()` apart when none of ours
   is in flight (the refusals must persist over `quota_evidence_s`).
5. The monthly breaker opens on an explicit monthly/quota detail at once, or when
   `threshold` (= min(declared, 3)) calls sent in doubt were refused with no success and
   none sent in doubt is still on the wire (a burst over the real limit gets its refusals
   back at once and its successes only after the latency): at most `declared` calls after
   the first refusal.
6. When every ambiguous refusal could also mean a bad key or a model not enabled (a 403
   "not permitted" or a 4003 that does not say why) and nothing succeeded in this run, the
   verdict is `access`: the run stops naming the credentials, instead of deferring every
   file for a month.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .errors import ConcurrencyLimited, ModulateError, MonthlyLimitReached

__all__ = ["ModelGate"]

BREAKER_MAX_THRESHOLD = 3
_MAX_RAISE_BACKOFF = 6  # a raise of the gate waits at most limit * 2**6 successes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Permit:
    """Leave to send one call; `probe` when it is the one call probing a suspect gate."""

    probe: bool


@dataclass(frozen=True)
class Ticket:
    """One call on the wire, by its send order."""

    seq: int
    others: int = 0  # our other calls on the wire as it was sent


class ModelGate:
    """The run's evidence about one org+model: the concurrency the service accepts, whether the
    month looks used up, and one-at-a-time probing while in doubt. One per run and model;
    lives on one event loop.
    """

    def __init__(self, *, model: str, declared: int, source: str | None = None) -> None:
        if declared < 1:
            raise ValueError("declared must be at least 1")
        self.model = model
        self.declared = declared
        self.source = source or "the limits block"  # named in the warning, e.g. "limits block 'x'"
        self.limit = declared
        self.in_flight = 0
        self.successes = 0
        self.threshold = min(declared, BREAKER_MAX_THRESHOLD)
        self.open = False
        self.verdict: str | None = None  # "quota" or "access" once open
        self.reason: str | None = None
        self._seq = 0
        self._doubt_since: int | None = None  # seq when the first ambiguous refusal came
        self._post_doubt = 0  # ambiguous refusals of calls sent after that
        self._last_detail: str | None = None
        self._on_wire: set[int] = set()  # seqs of the calls in flight
        self.alone = False  # the last ambiguous refusal came with none of ours in flight
        self._access_only = True  # every unexplained refusal could also be a bad key
        self._explicit = False
        self._streak = 0  # successes since the limit last changed
        self._raise_backoff = 0
        self._raised_at: int | None = None  # seq of the first call after a raise
        self._warned = False
        # The fewest of our other calls on the wire during a call refused for concurrency,
        # below the declared limit; None while no such refusal came.
        self.took_at_most: int | None = None
        self._probing = False
        self._waiters: list[asyncio.Future[None]] = []
        self.listeners: list[Callable[[int], None]] = []  # told the new limit when it changes

    @property
    def suspect(self) -> bool:
        """True once a call sent in doubt was refused too, until a fresh success."""
        return self._post_doubt > 0

    def sent(self) -> Ticket:
        """Count a call going on the wire."""
        self._seq += 1
        self.in_flight += 1
        self._on_wire.add(self._seq)
        return Ticket(self._seq, others=self.in_flight - 1)

    def admitted(self, ticket: Ticket) -> None:
        """The service accepted the call: a 2xx, or a stream's first message."""
        self.successes += 1
        if self._doubt_since is not None and ticket.seq > self._doubt_since:
            self._doubt_since = None  # a call sent in doubt got through: not the month
            self._post_doubt = 0
            self._access_only = True
            self._notify()
        self._streak += 1
        if self._raised_at is not None and ticket.seq >= self._raised_at:
            self._raise_backoff = 0  # a call sent above the old limit got through
            self._raised_at = None
        needed = self.limit * 2**self._raise_backoff
        if self.limit < self.declared and self.in_flight >= self.limit and self._streak >= needed:
            self._set_limit(self.limit + 1)
            self._raised_at = self._seq + 1

    def refused(self, ticket: Ticket, error: ModulateError) -> None:
        """Weigh a refused call (any ModulateError; only limit errors change the gate)."""
        others = self.in_flight - 1
        if isinstance(error, MonthlyLimitReached):
            self._explicit = True
            self._trip("quota", f"{self.model}: the service says the monthly limit is reached")
            return
        if not isinstance(error, ConcurrencyLimited):
            return
        if self._raised_at is not None and ticket.seq >= self._raised_at:
            self._raise_backoff = min(self._raise_backoff + 1, _MAX_RAISE_BACKOFF)
            self._raised_at = None
        # On the wire as it was sent, or sent since (the calls after it may lift the count
        # by one or two: a bound, not an estimate).
        overlapping = ticket.others + self._seq - ticket.seq
        if 0 < overlapping < min(self.declared, self.took_at_most or self.declared):
            self.took_at_most = overlapping
        if others < self.limit:
            self._set_limit(max(1, others))
        if not error.quota_suspect:
            return  # the service says "too many at once": nothing more to weigh
        self.alone = others == 0
        self._access_only = self._access_only and error.access_suspect
        if self._doubt_since is None:
            self._doubt_since = self._seq  # the calls already sent knew nothing of it
            return
        if ticket.seq <= self._doubt_since:
            return
        self._post_doubt += 1
        self._last_detail = error.detail
        self._notify()

    def finished(self, ticket: Ticket) -> None:
        """The call is off the wire, whatever its outcome."""
        self.in_flight -= 1
        self._on_wire.discard(ticket.seq)
        self._judge()

    def _judge(self) -> None:
        """Open the breaker once `threshold` calls sent in doubt were refused with no success,
        and none sent in doubt is still on the wire. A refusal comes back at once and a
        success only after the call's latency, so a burst sent in doubt over the real limit
        returns its refusals first: the calls of that burst still out must be heard."""
        doubt = self._doubt_since
        if doubt is None or self.open or self._post_doubt < self.threshold:
            return
        if any(seq > doubt for seq in self._on_wire):
            return
        if self.successes == 0 and self._access_only:
            self._trip(
                "access",
                f"{self.model}: every call was refused ({self._last_detail or 'no detail'})"
                " and none succeeded: the API key is wrong, the model is not enabled for the"
                " organisation, or its monthly limit is used up",
            )
        else:
            self._trip(
                "quota",
                f"{self.model}: {self._post_doubt + 1} refusals with no success between"
                " them, the later ones sent after the first was seen",
            )

    def probe_spacing(self, quota_evidence_s: float) -> float:
        """The least wait before a re-probe: while suspect with none of ours in flight, so
        that the `threshold` probes span `quota_evidence_s`; else none (calls in flight
        will tell more)."""
        return quota_evidence_s / self.threshold if self.suspect and self.alone else 0.0

    @property
    def likely_cause(self) -> str | None:
        """A human explanation once the gate is open or suspect, else None."""
        if not (self.open or self.suspect):
            return None
        if self._explicit:
            return "the monthly usage limit for this model is reached"
        if self.verdict == "access":
            return self.reason
        return "the monthly usage limit (credits) for this model is probably used up"

    @contextlib.asynccontextmanager
    async def permit(self, *, retry: bool) -> AsyncIterator[Permit]:
        """Wait until this call may go, holding no slot meanwhile.

        While suspect, only retries go, one at a time: they are the probes. Take the slot
        inside, then ask `may_send()`: the gate may have turned suspect while the call
        waited for its slot.
        """
        await self._wait_for(lambda: self.open or not self.suspect or (retry and not self._probing))
        probe = self.suspect and not self.open
        self._probing = self._probing or probe
        try:
            yield Permit(probe)
        finally:
            if probe:
                self._probing = False
                self._notify()

    def may_send(self, permit: Permit) -> bool:
        """True when the call holding `permit` may go on the wire now."""
        return not self.open and (permit.probe or not self.suspect)

    def _set_limit(self, limit: int) -> None:
        self.limit = limit
        self._streak = 0
        if limit < self.declared and not self._warned:
            self._warned = True
            logger.warning(
                "%s says %d for %s, the service accepted at most %d at once: holding %d and "
                "probing back up.",
                self.source, self.declared, self.model, limit, limit,
            )
        for listener in self.listeners:
            listener(limit)

    def _trip(self, verdict: str, reason: str) -> None:
        if not self.open:
            self.open, self.verdict, self.reason = True, verdict, reason
        self._notify()

    async def _wait_for(self, ready: Callable[[], bool]) -> None:
        loop = asyncio.get_running_loop()
        while not ready():
            changed = loop.create_future()
            self._waiters.append(changed)
            await changed

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for changed in waiters:
            if not changed.done():
                changed.set_result(None)

    def __repr__(self) -> str:
        return (
            f"ModelGate(model={self.model!r}, limit={self.limit}/{self.declared},"
            f" open={self.open}, suspect={self.suspect}, post_doubt={self._post_doubt})"
        )

