"""The order a run sends its files in: largest first, within a bounded look-ahead.

A run ends when its last call ends, and a call's latency grows with its audio. In listing
order an hour-long call sits wherever its key sorts; started near the end, it runs alone
while the other slots idle. Taking the largest of the next `LOOKAHEAD_OBJECTS` listed
objects first (longest-processing-time-first, within a window) starts the long calls early
and ends the run on short ones, so the slots drain together. An object's size stands in
for its duration: the listing has sizes, not durations, and within one codec the bytes
grow with the seconds.

Memory stays bounded whatever the bucket holds: at most `window` objects (a few hundred
bytes each) wait here, on top of the listing's page.
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator

from tasks.s3 import AudioObject

__all__ = ["LOOKAHEAD_OBJECTS", "largest_first"]

# One S3 listing page: the first page arrives whole, so filling the window costs no wait
# before the first call; 1,000 objects are ~0.3 MB.
LOOKAHEAD_OBJECTS = 1000


async def largest_first(
    objects: AsyncIterator[AudioObject], window: int = LOOKAHEAD_OBJECTS
) -> AsyncIterator[AudioObject]:
    """Yield `objects` reordered: each time, the largest of the next `window` not yet yielded.

    Ties keep listing order. `window` 1 is listing order; a window as large as the listing
    sorts all of it.
    """
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    waiting: list[tuple[int, int, AudioObject]] = []
    listed = 0
    async for obj in objects:
        heapq.heappush(waiting, (-obj.size, listed, obj))
        listed += 1
        if len(waiting) == window:
            yield heapq.heappop(waiting)[2]
    while waiting:
        yield heapq.heappop(waiting)[2]
