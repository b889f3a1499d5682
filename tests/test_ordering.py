"""The run's send order: largest first within a bounded look-ahead of the listing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from tasks.ordering import largest_first
from tasks.s3 import AudioObject

WHEN = datetime(2026, 1, 1, tzinfo=UTC)


def objects(sizes: list[int]) -> list[AudioObject]:
    return [
        AudioObject(
            bucket="b", key=f"call-{i:04d}.wav", size=size, etag=f"e{i}", last_modified=WHEN
        )
        for i, size in enumerate(sizes)
    ]


class Listing:
    """An async listing that counts what it has handed out."""

    def __init__(self, items: list[AudioObject]) -> None:
        self.items, self.listed = items, 0

    async def __aiter__(self) -> AsyncIterator[AudioObject]:
        for item in self.items:
            self.listed += 1
            yield item


async def test_never_holds_more_than_the_window() -> None:
    rng = random.Random(7)
    listing = Listing(objects([rng.randrange(1, 10**6) for _ in range(2_000)]))
    window, received, most_held = 50, [], 0
    async for obj in largest_first(listing.__aiter__(), window):
        received.append(obj)
        most_held = max(most_held, listing.listed - len(received) + 1)
    assert most_held == window
    assert sorted(o.key for o in received) == [o.key for o in listing.items]  # each once


async def test_each_object_is_the_largest_of_its_window() -> None:
    rng = random.Random(3)
    items = objects([rng.randrange(1, 1000) for _ in range(300)])
    window = 20
    sent = [o async for o in largest_first(Listing(items).__aiter__(), window)]
    waiting = list(items[: window - 1])
    for position, obj in enumerate(sent):
        if window - 1 + position < len(items):
            waiting.append(items[window - 1 + position])
        assert obj.size == max(o.size for o in waiting)
        waiting.remove(obj)


async def test_whole_listing_in_the_window_is_sorted_and_ties_keep_listing_order() -> None:
    items = objects([5, 9, 5, 1, 9])
    sent = [o.key async for o in largest_first(Listing(items).__aiter__(), 10)]
    assert sent == ["call-0001.wav", "call-0004.wav", "call-0000.wav", "call-0002.wav",
                    "call-0003.wav"]
    listed = [o.key async for o in largest_first(Listing(items).__aiter__(), 1)]
    assert listed == [o.key for o in items]


async def test_window_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="window must be at least 1"):
        async for _ in largest_first(Listing([]).__aiter__(), 0):
            pass


class PagedListing(Listing):
    """Two pages; the second comes only when `second_page` is set (S3 still answering)."""

    def __init__(self, first: list[AudioObject], second: list[AudioObject]) -> None:
        super().__init__(first + second)
        self.page_size = len(first)
        self.second_page = asyncio.Event()

    def ready(self) -> bool:
        return self.listed < self.page_size or self.second_page.is_set()

    async def __aiter__(self) -> AsyncIterator[AudioObject]:
        for position, item in enumerate(self.items):
            if position == self.page_size:
                await self.second_page.wait()
            self.listed += 1
            yield item


async def test_while_the_next_page_is_on_its_way_the_largest_listed_go_first() -> None:
    """With a window one page long, the second file waited for the second page: so did the
    first chunk's calls, at every run's start."""
    rng = random.Random(5)
    first = objects([rng.randrange(1, 10**6) for _ in range(100)])
    listing = PagedListing(first, objects([10**7] * 10))
    sent: list[AudioObject] = []
    async with asyncio.timeout(60):  # the old rule waits for the second page: forever here
        async for obj in largest_first(listing.__aiter__(), len(first), listing.ready):
            sent.append(obj)
            if len(sent) == 30:
                break
    assert [o.size for o in sent] == sorted((o.size for o in first), reverse=True)[:30]
    assert listing.listed == len(first)

    listing.second_page.set()  # once it has come, its objects join the window as before
    rest = [o async for o in largest_first(listing.__aiter__(), len(first), listing.ready)]
    assert len(rest) == len(listing.items)
