"""Hold an org+model's share of a Prefect concurrency limit and hand its slots out locally.

Waiting on the Prefect server per call costs a round trip and serialises every
acquirer of one limit in a process (DESIGN.md section 3). So a run leases slots in
as few requests as it can while it has queued work, renews the leases from the
event loop, gives them back as its queue drains, and lets its own calls share the
slots it holds through a local FIFO queue. A dead worker's leases expire on the
server after `lease_duration`, so no slot leaks.

Without a Prefect limit of that name (limits not synced) the pool falls back to a
local gate of `fallback_limit` slots and says so once in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

import httpx
from prefect.client.orchestration import PrefectClient, get_client
from prefect.exceptions import ObjectNotFound

__all__ = ["SlotPool", "limit_name"]

DEFAULT_LEASE_SECONDS = 60.0
TOPUP_INTERVAL_SECONDS = 0.25

logger = logging.getLogger(__name__)


def limit_name(org: str, model: str) -> str:
    """The Prefect concurrency limit that stands for one org's limit on one model.

    Prefect limit names may not contain "/", so the parts are joined with ":".
    """
    return f"modulate:{org}:{model}"


@dataclass
class _Lease:
    lease_id: UUID
    slots: int


class SlotPool:
    """The slots one run holds on one Prefect concurrency limit.

    Example:
        async with SlotPool("modulate:acme:stt", fallback_limit=5) as pool:
            pool.add_demand(len(files))
            async with pool.slot():
                ...  # one call to the vendor
            pool.add_demand(-1)
    """

    def __init__(
        self,
        name: str,
        *,
        fallback_limit: int,
        lease_duration: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.name = name
        self.fallback_limit = fallback_limit
        self.lease_duration = lease_duration
        self.limit = fallback_limit
        self.managed = False  # True once a Prefect limit of this name was found
        self.max_in_use = 0
        self._leases: list[_Lease] = []
        self._in_use = 0
        self._demand = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._wake = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Slots this run may use now: leased ones, or the local fallback."""
        if not self.managed:
            return self.fallback_limit
        return sum(lease.slots for lease in self._leases)

    async def __aenter__(self) -> SlotPool:
        async with get_client() as client:
            try:
                found = await client.read_global_concurrency_limit_by_name(self.name)
            except ObjectNotFound:
                found = None
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
            self._maintainer = asyncio.create_task(self._maintain(), name=f"slots {self.name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        async with get_client() as client:
            for lease in self._leases:
                await self._release(client, lease)
        self._leases.clear()

    def add_demand(self, n: int) -> None:
        """Count calls queued or running (n may be negative); the pool leases to match."""
        self._demand += n
        self._wake.set()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the length of one call; waiters are served first come, first served.

        FIFO matters for throughput, not only fairness: the files of the oldest chunk get
        slots first, so that chunk finishes and is replaced while the younger chunks still
        have queued work. Waking every waiter on each release (a Condition) let all chunks
        advance in lockstep and drain together, leaving the slots idle between waves.
        """
        if self._in_use < self.held and not self._waiters:
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

    def _grant(self) -> None:
        """Hand free slots to the oldest waiters."""
        while self._waiters and self._in_use < self.held:
            granted = self._waiters.popleft()
            if granted.done():  # its waiter was cancelled
                continue
            self._in_use += 1
            granted.set_result(None)

    async def _maintain(self) -> None:
        renew_every = self.lease_duration / 3
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + renew_every
        async with get_client() as client:
            while True:
                await self._top_up(client)
                await self._give_back(client)
                if loop.time() >= next_renewal:
                    for lease in self._leases:
                        await client.renew_concurrency_lease(lease.lease_id, self.lease_duration)
                    next_renewal = loop.time() + renew_every
                self._wake.clear()
                # Woken early when demand changes or a call ends; otherwise poll for
                # slots other runs have freed.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TOPUP_INTERVAL_SECONDS)

    async def _top_up(self, client: PrefectClient) -> None:
        wanted = min(self._demand, self.limit) - self.held
        if wanted <= 0:
            return
        found = await client.read_global_concurrency_limit_by_name(self.name)
        self.limit = found.limit
        ask = min(wanted, found.limit - found.active_slots)
        # A request for k slots is all-or-nothing; halve it until one fits.
        while ask > 0:
            try:
                response = await client.increment_concurrency_slots_with_lease(
                    names=[self.name],
                    slots=ask,
                    mode="concurrency",
                    lease_duration=self.lease_duration,
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                ask //= 2
                continue
            self._leases.append(_Lease(UUID(response.json()["lease_id"]), ask))
            self._grant()
            return

    async def _give_back(self, client: PrefectClient) -> None:
        spare = self.held - max(min(self._demand, self.limit), self._in_use)
        for lease in sorted(self._leases, key=lambda lease: lease.slots):
            if lease.slots > spare:
                break
            self._leases.remove(lease)
            spare -= lease.slots
            await self._release(client, lease)

    async def _release(self, client: PrefectClient, lease: _Lease) -> None:
        try:
            await client.release_concurrency_slots_with_lease(lease.lease_id)
        except httpx.HTTPError:
            # The lease expires on the server by itself; nothing is lost but time.
            logger.warning("Could not release a lease on %r; it expires on its own.", self.name)
