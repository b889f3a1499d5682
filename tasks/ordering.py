"""The order a run sends its files in, within a bounded look-ahead of the listing.

`order_files()` takes the run's `file_order`. The default, "largest", is for speed:

A run ends when its last call ends, and a call's latency grows with its audio. In listing
order an hour-long call sits wherever its key sorts; started near the end, it runs alone
while the other slots idle. Taking the largest of the next `LOOKAHEAD_OBJECTS` listed
objects first (longest-processing-time-first, within a window) starts the long calls early
and ends the run on short ones, so the slots drain together. An object's size stands in
for its duration: the listing has sizes, not durations, and within one codec the bytes
grow with the seconds.

"oldest", "newest" and "smallest" say which files a monthly budget that cannot cover the
backlog is spent on (tasks/budget.py); they sort each window of `window` listed objects.
"listing" is S3 key order.

Memory stays bounded whatever the bucket holds: at most `window` objects (a few hundred
bytes each) wait here, on top of the listing's pages.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Callable
from typing import Literal

from tasks.s3 import AudioObject

__all__ = [
    "DEFAULT_FILE_ORDER", "LOOKAHEAD_OBJECTS", "FileOrder", "largest_first", "order_files",
]

# One full S3 listing page; no call waits for the window to fill (`largest_first` hands out
# what is listed while the next page is on its way). 1,000 objects are ~0.3 MB.
LOOKAHEAD_OBJECTS = 1000

FileOrder = Literal["largest", "oldest", "newest", "smallest", "listing"]
DEFAULT_FILE_ORDER: FileOrder = "largest"


async def largest_first(
    objects: AsyncIterator[AudioObject],
    window: int = LOOKAHEAD_OBJECTS,
    ready: Callable[[], bool] = lambda: True,
) -> AsyncIterator[AudioObject]:
    """Yield `objects` reordered: each time, the largest of the next `window` not yet yielded.

    Ties keep listing order. `window` 1 is listing order; a window as large as the listing
    sorts all of it. While `ready()` is False (the listing would wait for S3), the largest
    of those listed so far goes instead of waiting: with the window one page long, the
    second file of a run waited for the second page (0.6 s from moto), and so did every
    call of the first chunk.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    listing = aiter(objects)
    waiting: list[tuple[int, int, AudioObject]] = []
    listed = 0
    ended = False
    while True:
        while not ended and len(waiting) < window and (not waiting or ready()):
            try:
                obj = await anext(listing)
            except StopAsyncIteration:
                ended = True
                break
            heapq.heappush(waiting, (-obj.size, listed, obj))
            listed += 1
        if not waiting:
            return
        yield heapq.heappop(waiting)[2]


async def order_files(
    objects: AsyncIterator[AudioObject],
    order: FileOrder,
    window: int,
    ready: Callable[[], bool] = lambda: True,
) -> AsyncIterator[AudioObject]:
    """Yield the listing in `order`, holding at most `window` objects.

    "largest" slides its window (see `largest_first`, which also takes the listing's
    `ready`); the other sorts are exact within each window of `window` listed files, and
    windows follow the listing (S3 key order). "listing" passes the listing through as it
    comes.
    """
    if order == "largest":
        async for obj in largest_first(objects, window, ready):
            yield obj
        return
    if order == "listing":
        async for obj in objects:
            yield obj
        return
    pending: list[AudioObject] = []
    async for obj in objects:
        pending.append(obj)
        if len(pending) >= window:
            for ordered in _sorted(pending, order):
                yield ordered
            pending = []
    for ordered in _sorted(pending, order):
        yield ordered


def _sorted(objects: list[AudioObject], order: FileOrder) -> list[AudioObject]:
    if order == "smallest":
        return sorted(objects, key=lambda o: (o.size, o.key))
    return sorted(objects, key=lambda o: (o.last_modified, o.key), reverse=order == "newest")
