"""tasks/heap.py: what a run starts with is out of the collector's passes until the run ends."""

from __future__ import annotations

import gc
import weakref

import pytest

from tasks.heap import frozen_heap


class Node:
    """A garbage cycle only the cyclic collector can free."""

    def __init__(self) -> None:
        self.me = self


def test_a_cycle_from_before_the_run_waits_for_the_last_run_to_end() -> None:
    assert gc.get_freeze_count() == 0
    old = Node()
    alive = weakref.ref(old)
    with frozen_heap():
        assert gc.get_freeze_count() > 0  # it falls as frozen objects are freed: no ==
        del old
        with frozen_heap():  # a second run in the same process
            pass
        gc.collect()
        assert alive() is not None, "the first run is still going: its start stays frozen"
        young = Node()
        young_alive = weakref.ref(young)
        del young
        gc.collect()
        assert young_alive() is None, "what the run itself makes is collected as ever"
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None


def test_a_run_that_fails_unfreezes_the_heap() -> None:
    with pytest.raises(RuntimeError), frozen_heap():
        raise RuntimeError("the run stopped")
    assert gc.get_freeze_count() == 0
