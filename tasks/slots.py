"""Hold an org+model's share of a Prefect concurrency limit and hand its slots out locally.

Waiting on the Prefect server per call costs a round trip and serialises every acquirer of
one limit in a process (DESIGN.md section 3). So a run leases slots while it has queued
work, in units of about C/8 so it can give some back; renews the leases; gives back what
its queue, its gate (the concurrency the service accepts) or its fair share no longer
needs; and lets its own calls share what it holds through a local FIFO queue.

A lease is given back whole, so a surplus is returned as the smallest set of leases that
covers it; meanwhile no new call gets those slots, each lease of the set goes back as soon
as the run's calls fit in the rest, and singles top the run up to its target again.
(Returning whatever whole leases fit as calls end one by one spends the singles first and
leaves a surplus no lease fits: 16 held, 13 used and 3 idle for good.) A dead worker's
leases expire on the server after `lease_duration`, so no slot leaks.

Fair share: every run with work holds one slot of `<limit>:runs`, and every run that
wants more than it could get holds one of `<limit>:waiting`. While someone waits, no run
holds more than ceil(C / runs); so a run that starts beside one holding every slot gets
half of them as the other's calls end.

The lease layer is supervised, like Prefect's own `concurrency/_leases.py`: a failed call
is retried with backoff, a lease the server no longer knows (404/410 on renewal, the limit
deleted or recreated) is dropped, which shrinks what the run holds, and when the server
cannot be reached for `failure_bound` seconds every waiting and future `slot()` raises
`SlotsLost`. It never leaves a caller waiting forever.

Without a Prefect limit of that name (limits not synced) the pool falls back to a local
gate of `fallback_limit` slots and says so once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

__all__ = ["SlotPool", "SlotsLost", "limit_name", "registry_names"]

DEFAULT_LEASE_SECONDS = 60.0  # the server's minimum
DEFAULT_FAILURE_BOUND_SECONDS = 60.0
TOPUP_INTERVAL_SECONDS = 0.25
# How soon a run holding slots sees that another waits: it goes into a newcomer's wait for
# its share (bench --only shared: B's half 2.6-5.2 s at 1 s). One read of the server while
# nobody waits; each Prefect call costs the calls' event loop ~3 ms of CPU on a slow host.
FAIR_SHARE_INTERVAL_SECONDS = 0.5
LIMIT_CHECK_INTERVAL_SECONDS = 2.0  # the limit still there, and its size
LEASE_UNITS = 8  # a run leases its slots in about this many pieces
REGISTRY_LIMIT = 100_000  # registry limits count runs; they never refuse one
_BACKOFF_CAP_SECONDS = 10.0
_QUIET_FAILURES = 3  # a SQLite server answers 503 "database is locked" now and then: no warning
_LEASE_GONE = frozenset({404, 410})  # Prefect answers 410 for a lease that expired
_BUSY = frozenset({408, 502, 503})

logger = logging.getLogger(__name__)


def limit_name(org: str, model: str) -> str:
    """The Prefect concurrency limit that stands for one org's limit on one model.

    Prefect limit names may not contain "/", so the parts are joined with ":".
    """
    return f"modulate:{org}:{model}"


def registry_names(name: str) -> tuple[str, str]:
    """The two limits that count the runs sharing `name`: with work, and waiting for slots."""
    return f"{name}:runs", f"{name}:waiting"


class SlotsLost(RuntimeError):
    """The lease layer could not reach the Prefect API (or lost its limit) for too long."""


@dataclass
class _Lease:
    lease_id: UUID
    slots: int
    expires_at: float  # loop time by which the server forgets it unless renewed


class SlotPool:
    """The slots one run holds on one Prefect concurrency limit.

    Example:
        async with SlotPool("modulate:acme:stt", fallback_limit=5) as pool:
            async with pool.wanted():  # the pool leases while the file is read
                audio = ...
                async with pool.slot():
                    ...  # one call to the vendor
    """

    def __init__(
        self,
        name: str,
        *,
        fallback_limit: int,
        lease_duration: float = DEFAULT_LEASE_SECONDS,
        renew_every: float | None = None,
        failure_bound: float = DEFAULT_FAILURE_BOUND_SECONDS,
    ) -> None:
        self.name = name
        self.fallback_limit = fallback_limit
        self.lease_duration = lease_duration
        self.renew_every = renew_every if renew_every is not None else lease_duration / 3
        self.failure_bound = failure_bound
        self.limit = fallback_limit
        self.managed = False  # True once a Prefect limit of this name was found
        self.max_in_use = 0
        self.ceiling = fallback_limit  # what the service accepts, as the run's gate learns it
        self._limit_id: UUID | None = None
        self._leases: list[_Lease] = []
        self._returning = 0  # slots of the leases chosen to go back, no longer handed out
        self._registry: dict[str, _Lease | None] = dict.fromkeys(registry_names(name))
        self._runs = 1
        self._registry_made = False  # both registry limits exist (the first _share makes them)
        self._others_waiting = False
        self._in_use = 0
        self._demand = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._wake = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self._lost: SlotsLost | None = None

    @property
    def held(self) -> int:
        """Slots this run may use now: leased ones, or the local fallback."""
        if not self.managed:
            return self.fallback_limit
        return sum(lease.slots for lease in self._leases)

    @property
    def fair_share(self) -> int:
        """The most this run keeps while another run waits for slots."""
        return math.ceil(self.limit / max(1, self._runs))

    async def __aenter__(self) -> SlotPool:
        found = await self._first_lookup()
        if found is None or not found.active:
            logger.warning(
                "No active Prefect concurrency limit %r: holding the limit only inside this run "
                "(%d at once). Run `modulate-flows limits sync` to share it across runs.",
                self.name,
                self.fallback_limit,
            )
        else:
            self.managed = True
            self.limit = found.limit
            self._limit_id = found.id
            self._maintainer = asyncio.create_task(self._maintain(), name=f"slots {self.name}")
            self._maintainer.add_done_callback(self._maintainer_ended)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        if not self.managed:
            return
        held = [*self._leases, *(lease for lease in self._registry.values() if lease)]
        self._leases.clear()
        async with get_client() as client:
            for lease in held:
                await self._release(client, lease)

    def add_demand(self, n: int) -> None:
        """Count calls queued or running (n may be negative); the pool leases to match."""
        self._demand += n
        self._wake.set()

    @contextlib.asynccontextmanager
    async def wanted(self) -> AsyncIterator[None]:
        """Count one call queued or running for the length of the block."""
        self.add_demand(1)
        try:
            yield
        finally:
            self.add_demand(-1)

    def set_ceiling(self, ceiling: int) -> None:
        """Hand out at most `ceiling` slots at once (the gate's learned limit)."""
        self.ceiling = ceiling
        self._grant()
        self._wake.set()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the length of one call; waiters are served first come, first served.

        FIFO matters for throughput, not only fairness: the files of the oldest chunk get
        slots first, so that chunk finishes and is replaced while the younger chunks still
        have queued work. Waking every waiter on each release (a Condition) let all chunks
        advance in lockstep and drain together, leaving the slots idle between waves.

        Raises:
            SlotsLost: the lease layer failed for longer than `failure_bound`.
        """
        if self._lost is not None:
            raise self._lost
        if self._in_use < self._usable() and not self._waiters:
            self._in_use += 1
        else:
            granted = asyncio.get_running_loop().create_future()
            self._waiters.append(granted)
            try:
                await granted  # resolved by _grant(), which counted the slot as ours
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._in_use -= 1  # granted just as we were cancelled: pass it on
                    self._grant()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(granted)
                raise
        self.max_in_use = max(self.max_in_use, self._in_use)
        try:
            yield
        finally:
            self._in_use -= 1
            self._grant()
            self._wake.set()

    def _usable(self) -> int:
        usable = min(self.held - self._returning, self.ceiling)
        return min(usable, self.fair_share) if self._others_waiting else usable

    def _grant(self) -> None:
        """Hand free slots to the oldest waiters."""
        usable = self._usable()
        while self._waiters and self._in_use < usable:
            granted = self._waiters.popleft()
            if granted.done():  # its waiter was cancelled
                continue
            self._in_use += 1
            granted.set_result(None)

    def _maintainer_ended(self, task: asyncio.Task[None]) -> None:
        """A bug in the maintainer must fail the waiters, not leave them waiting forever."""
        if task.cancelled() or self._lost is not None:
            return
        error = task.exception()
        if error is not None:
            logger.error("The lease keeper of %r failed: %r", self.name, error)
            self._fail(SlotsLost(
                f"The lease keeper of the Prefect concurrency limit {self.name!r} failed "
                f"({type(error).__name__}); the run stops with its results so far."
            ))

    def _fail(self, error: SlotsLost) -> None:
        self._lost = error
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    # --- the maintainer ----------------------------------------------------------------

    async def _first_lookup(self) -> GlobalConcurrencyLimitResponse | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.failure_bound
        failures = 0
        async with _lease_client() as client:
            while True:
                try:
                    return await client.read_global_concurrency_limit_by_name(self.name)
                except ObjectNotFound:
                    return None
                except httpx.HTTPError as exc:
                    failures += 1
                    if loop.time() >= deadline:
                        raise self._lost_error(exc, self.failure_bound) from None
                    await asyncio.sleep(_backoff(failures))

    async def _maintain(self) -> None:
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + self.renew_every
        next_share = next_check = loop.time()
        last_ok = loop.time()
        failures = 0
        async with _lease_client() as client:
            while True:
                # Cleared as a pass begins, not as it ends: demand that changes during a
                # pass's round trips starts the next pass at once, not up to
                # TOPUP_INTERVAL_SECONDS later (the first chunk's demand waited 0.27 s).
                self._wake.clear()
                try:
                    self._drop_expired(loop.time())
                    if loop.time() >= next_check:
                        await self._read_limit(client)
                        next_check = loop.time() + LIMIT_CHECK_INTERVAL_SECONDS
                    await self._give_back(client)
                    await self._top_up(client)
                    # After the top-up, and not before the run has work or a registration:
                    # a run's first lease need not wait for the registry reads (it came
                    # 0.46 s after the fan-out began, with them first; 0.20 s after).
                    registered = any(lease is not None for lease in self._registry.values())
                    if loop.time() >= next_share and (self._demand > 0 or registered):
                        await self._share(client)
                        next_share = loop.time() + FAIR_SHARE_INTERVAL_SECONDS
                    if self._registry_made:  # by the first _share
                        await self._say_if_short(client)
                    if loop.time() >= next_renewal:
                        await self._renew(client)
                        next_renewal = loop.time() + self.renew_every
                except (httpx.HTTPError, ObjectNotFound, _LimitGone) as exc:
                    failures += 1
                    if failures == _QUIET_FAILURES:
                        logger.warning(
                            "Prefect API trouble holding slots of %r (%s); retrying with backoff.",
                            self.name, _describe(exc),
                        )
                    if loop.time() - last_ok >= self.failure_bound:
                        self._fail(self._lost_error(exc, loop.time() - last_ok))
                        return
                    await asyncio.sleep(_backoff(failures))
                    continue
                if failures >= _QUIET_FAILURES:
                    logger.warning("Prefect API back for %r after %d failures.", self.name,
                                   failures)
                failures, last_ok = 0, loop.time()
                # Woken early when demand changes or a call ends; otherwise poll for
                # slots other runs have freed. asyncio.timeout, not wait_for: Python 3.11's
                # wait_for can swallow a cancel that lands as the wait ends, and then
                # __aexit__ waits on this task forever (seen with 50 calls ending at once).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TOPUP_INTERVAL_SECONDS):
                        await self._wake.wait()

    def _target(self) -> int:
        """How many slots this run should hold now."""
        target = min(self._demand, self.limit, self.ceiling)
        return min(target, self.fair_share) if self._others_waiting else target

    async def _top_up(self, client: PrefectClient) -> None:
        wanted = self._target() - self.held
        if wanted <= 0:
            return
        found = await self._read_limit(client)
        free = found.limit - found.active_slots
        # Units of about C/8, and unit - 1 single slots at the end, so that _give_back can
        # return any number of slots in whole leases. All of them in this pass: a run that
        # starts beside others gets its share as soon as it is free.
        unit = max(1, math.ceil(found.limit / LEASE_UNITS))
        while wanted > 0 and free > 0:
            singles = max(0, unit - 1 - sum(lease.slots == 1 for lease in self._leases))
            ask = min(free, 1 if wanted <= singles else min(wanted - singles, unit))
            lease = await self._lease_halving(client, ask)
            if lease is None:
                break
            self._leases.append(lease)
            self._grant()
            free -= lease.slots
            wanted = self._target() - self.held

    async def _say_if_short(self, client: PrefectClient) -> None:
        """Wait in the registry while short of the target, and count among the runs then."""
        short = self._target() > self.held
        if short:
            # Counted among the runs at once, not at the next fair-share pass: the runs
            # holding the slots size their share by that count.
            await self._register(client, "runs", True)
        await self._register(client, "waiting", short)

    async def _give_back(self, client: PrefectClient) -> None:
        """Give back the smallest set of whole leases that covers the surplus, each once free.

        Never part of a lease: the slots given back must be free of our calls the moment
        another run can take them. Each lease of the set goes back as soon as our calls fit
        in what remains, smallest first, not when the whole set is free: a slot whose call
        ended is another run's at once, not idle until the last call on the set ends.
        """
        surplus = self.held - self._target()
        chosen = _smallest_cover(self._leases, surplus) if surplus > 0 else []
        self._returning = sum(lease.slots for lease in chosen)
        self._grant()  # the surplus may have shrunk since the last look
        for lease in sorted(chosen, key=lambda lease: lease.slots):
            if self._in_use > self.held - lease.slots:
                return  # our calls are still on its slots; _grant hands them out no more
            # Forgotten before the release is sent: a run that ends meanwhile must not send
            # it again. Prefect's server reads a lease, decrements, then revokes it, so two
            # releases at once both decrement and the limit undercounts for every run.
            self._leases.remove(lease)
            self._returning -= lease.slots
            await self._release(client, lease)

    async def _share(self, client: PrefectClient) -> None:
        """See whether another run waits; join or leave the registry, and count the runs.

        The runs are counted only when someone waits (the share matters only then) or this
        run joins or leaves: one read per pass otherwise.
        """
        runs_name, waiting_name = registry_names(self.name)
        # Made here if missing (the first run of a limit, or someone deleted them), so that
        # _register only leases; read before joining, so a join counts itself.
        waiting = await _read_or_create(client, waiting_name)
        others = waiting.active_slots - (self._registry[waiting_name] is not None) > 0
        member = self._demand > 0
        if others or member != (self._registry[runs_name] is not None) or not self._registry_made:
            runs = await _read_or_create(client, runs_name)
            self._registry_made = True
            joined = self._registry[runs_name] is None and member
            await self._register(client, "runs", member)
            self._runs = max(1, runs.active_slots + joined)
        self._others_waiting = others
        self._grant()

    async def _register(self, client: PrefectClient, which: str, member: bool) -> None:
        name = registry_names(self.name)[0 if which == "runs" else 1]
        lease = self._registry[name]
        if member and lease is None:
            self._registry[name] = await self._lease(client, name, 1)
        elif not member and lease is not None:
            self._registry[name] = None
            await self._release(client, lease)

    async def _renew(self, client: PrefectClient) -> None:
        now = asyncio.get_running_loop().time()
        for lease in [*self._leases, *self._registry.values()]:
            if lease is None:
                continue
            try:
                await client.renew_concurrency_lease(lease.lease_id, self.lease_duration)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code not in _LEASE_GONE:
                    raise
                self._forget(lease, "the server no longer knows it")
            else:
                lease.expires_at = now + self.lease_duration

    async def _read_limit(self, client: PrefectClient) -> GlobalConcurrencyLimitResponse:
        try:
            found = await client.read_global_concurrency_limit_by_name(self.name)
        except ObjectNotFound:
            self._forget_all("the limit was deleted")
            raise _LimitGone(f"the Prefect concurrency limit {self.name!r} was deleted") from None
        if found.id != self._limit_id:  # recreated: our leases count against nothing now
            self._forget_all("the limit was recreated")
            self._limit_id = found.id
        self.limit = found.limit
        return found

    async def _lease_halving(self, client: PrefectClient, ask: int) -> _Lease | None:
        """A lease of at most `ask` slots, or None if not even one is free."""
        while ask > 0:
            lease = await self._lease(client, self.name, ask)
            if lease is not None:
                return lease
            ask //= 2  # all-or-nothing, and another run took some meanwhile: halve it
        return None

    async def _lease(self, client: PrefectClient, name: str, slots: int) -> _Lease | None:
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[name], slots=slots, mode="concurrency", lease_duration=self.lease_duration
            )
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return None
            raise
        expires_at = asyncio.get_running_loop().time() + self.lease_duration
        return _Lease(UUID(response.json()["lease_id"]), slots, expires_at)

    async def _release(self, client: PrefectClient, lease: _Lease) -> None:
        try:
            await client.release_concurrency_slots_with_lease(lease.lease_id)
        except httpx.HTTPError:
            # The lease expires on the server by itself; nothing is lost but time.
            logger.warning("Could not release a lease on %r; it expires on its own.", self.name)

    def _drop_expired(self, now: float) -> None:
        for lease in [lease for lease in self._leases if lease.expires_at <= now]:
            self._forget(lease, "it expired before it could be renewed")
        for name, lease in self._registry.items():
            if lease is not None and lease.expires_at <= now:
                self._registry[name] = None

    def _forget(self, lease: _Lease, why: str) -> None:
        if lease in self._leases:
            self._leases.remove(lease)
            logger.warning("Lost a lease of %d slots on %r (%s).", lease.slots, self.name, why)
        for name, held in self._registry.items():
            if held is lease:
                self._registry[name] = None

    def _forget_all(self, why: str) -> None:
        for lease in list(self._leases):
            self._forget(lease, why)
        self._registry = dict.fromkeys(self._registry)

    def _lost_error(self, exc: BaseException, seconds: float) -> SlotsLost:
        return SlotsLost(
            f"Could not hold slots of the Prefect concurrency limit {self.name!r} for "
            f"{seconds:.0f} s ({_describe(exc)}). Check that the Prefect API is up and that the "
            "limit exists (`modulate-flows limits sync`); the run stops with its results so far."
        )


def _lease_client() -> PrefectClient:
    """A Prefect client that leaves the retries of a busy server to the pool.

    Prefect's client waits 2, 4, 8 s (or as Retry-After says) before it retries a 502, 503
    or 408, and a server on SQLite answers 503 whenever another writer holds the database:
    a lease held back 7 s that way left a second run idle while the slots it waited for
    were free (bench/shared.py). The pool retries from 0.1 s itself, within
    `failure_bound`. A 429 (rate limit) and Prefect Cloud's maintenance answers are left
    to Prefect's client, which honours them.
    """
    return get_client(httpx_settings={"event_hooks": {"response": [_busy_fails_fast]}})


async def _busy_fails_fast(response: httpx.Response) -> None:
    if response.status_code in _BUSY and response.headers.get("Prefect-Maintenance") != "true":
        raise httpx.HTTPStatusError(
            f"Prefect API busy: HTTP {response.status_code}", request=response.request,
            response=response,
        )


class _LimitGone(Exception):
    """The limit disappeared from the server mid-run."""


async def _read_or_create(client: PrefectClient, name: str) -> GlobalConcurrencyLimitResponse:
    try:
        return await client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        with contextlib.suppress(ObjectAlreadyExists):  # another run made it first
            await client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=REGISTRY_LIMIT)
            )
        return await client.read_global_concurrency_limit_by_name(name)


def _smallest_cover(leases: list[_Lease], at_least: int) -> list[_Lease]:
    """The leases whose slots add up to the least total of at least `at_least` (all of
    them if none do). A run holds about a dozen leases, so every reachable total is kept."""
    best: dict[int, list[_Lease]] = {0: []}
    for lease in leases:
        for total, chosen in list(best.items()):
            best.setdefault(total + lease.slots, [*chosen, lease])
    covering = [total for total in best if total >= at_least]
    return best[min(covering)] if covering else list(leases)


def _backoff(failures: int) -> float:
    return min(_BACKOFF_CAP_SECONDS, 0.1 * 2 ** (failures - 1))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from {exc.request.url.path}"
    return str(exc) or type(exc).__name__
