"""Keep Python's cyclic garbage collector off the objects a batch run starts with.

Before its first call a run's process already holds some 460,000 objects that live as long
as it does: Prefect's client and engine, pydantic's schemas, botocore's service models. The
collector's full passes walk every one of them, with the event loop stopped meanwhile, so
every call that ends during a pass waits for it before its slot goes to the next file: one
pass took 0.40-0.54 s on the bench host (BENCHMARKS.md, session 8). `gc.freeze()` puts them
out of the collector's sight for the run; the collector still frees what the run makes and
drops, by reference count as ever and by its passes over everything younger.

The heap is unfrozen when the last run in the process ends, so garbage that was frozen
(a cycle among objects from before the run) is collected as usual afterwards. Runs that
overlap in one process (tests, `flow.serve`) share one freeze.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["frozen_heap"]

_lock = threading.Lock()  # runs in one process may run in different threads' event loops
_runs = 0


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now for the length of the block (the first block freezes,
    the last one to end unfreezes)."""
    global _runs
    with _lock:
        if _runs == 0:
            gc.freeze()
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                gc.unfreeze()
