"""The results writer's bound on paid results that are not yet durable (tasks/results_writer.py).

A SIGKILL loses what was paid for and not yet written; the writer promises at most 3C of
those (2C waiting to be written, C in flight), whatever the speed of the output. The output
here is a real local directory whose `files` table cannot be written until the test says so.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from store.compaction import SEGMENT_PREFIX
from store.location import OutputLocation, partition_dir, table_dir
from tasks.results_writer import MIN_FOLD_FRAGMENTS, ResultsWriter, WritePolicy
from tests.fault_proxy import until

C = 2
FILES = 20
# Retried every 0.1 s or sooner for 20 s: the output is stalled, not broken.
STALLED = WritePolicy(attempts=200, initial_s=0.01, cap_s=0.1)
WAIT_S = 30.0


def ledger_row(i: int) -> dict[str, object]:
    now = datetime.now(UTC)
    return {
        "file_id": f"f{i:03d}", "config_hash": "c", "model": "stt", "date": "2026-12-01",
        "flow_run_id": "run", "source_uri": f"s3://in/{i}.wav", "etag": "e", "size_bytes": 1,
        "status": "completed", "error_class": None, "error_detail": None, "attempts": 1,
        "audio_duration_ms": 1000, "started_at": now, "finished_at": now, "output_uri": None,
    }


async def settle() -> None:
    """Let every task that can run do so: all of them are in this event loop."""
    for _ in range(100):
        await asyncio.sleep(0)


async def test_no_more_than_3c_files_are_paid_for_and_not_durable(tmp_path: Path) -> None:
    """Shaped like tasks/batch.py: 2C files read ahead, each waits for room, then for one of
    C slots for its call, then hands its rows over. The service answers one call at a time,
    for as long as calls come, while the output is stalled."""
    location = OutputLocation(root=str(tmp_path / "out"))
    blocker = Path(table_dir(str(tmp_path / "out"), "files"))
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory: every write of the ledger fails until removed")
    reads, slots = asyncio.Semaphore(2 * C), asyncio.Semaphore(C)
    calls: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()

    async def one_file(i: int) -> None:
        async with reads:
            await writer.room(f"f{i:03d}")
            async with slots:
                answer = asyncio.get_running_loop().create_future()
                await calls.put(answer)
                await answer
        await writer.put(ledger_row(i), {})

    async with ResultsWriter(location, "c", max_files=C, max_delay_s=0.0, policy=STALLED) as writer:
        files = [asyncio.create_task(one_file(i)) for i in range(FILES)]
        paid = 0
        await settle()
        while not calls.empty():
            calls.get_nowait().set_result(None)
            paid += 1
            await settle()
        assert writer.flushes == 0, "the output was not stalled"
        assert paid <= 3 * C, f"{paid} calls paid for while none of them could be written"
        blocker.unlink()
        while paid < FILES:
            async with asyncio.timeout(WAIT_S):
                (await calls.get()).set_result(None)
            paid += 1
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*files)
    written = pd.read_parquet(table_dir(str(tmp_path / "out"), "files"))
    assert sorted(written.source_uri) == sorted(f"s3://in/{i}.wav" for i in range(FILES))


async def test_once_the_listing_ends_the_last_rows_are_written_without_waiting(
    tmp_path: Path,
) -> None:
    """Fewer than max_files wait for max_delay_s (fewer, larger fragments) while more files
    may come; once the run has listed its last file and every file holding room has handed
    its rows over, nothing else is coming: the writer flushes at once."""
    location = OutputLocation(root=str(tmp_path / "out"))
    async with ResultsWriter(location, "c", max_files=C, max_delay_s=WAIT_S) as writer:
        await writer.room("f000")
        await writer.room("f001")
        first = asyncio.create_task(writer.put(ledger_row(0), {}))
        await settle()
        assert writer.flushes == 0  # f001's call may still end within max_delay_s
        writer.listing_ended()
        await settle()
        assert writer.flushes == 0, "flushed while a file holding room had not handed over"
        second = asyncio.create_task(writer.put(ledger_row(1), {}))
        async with asyncio.timeout(WAIT_S / 3):  # well before max_delay_s
            await asyncio.gather(first, second)
        assert writer.flushes == 1
    written = pd.read_parquet(table_dir(str(tmp_path / "out"), "files"))
    assert sorted(written.source_uri) == ["s3://in/0.wav", "s3://in/1.wav"]


def partition_files(root: Path) -> tuple[int, int]:
    """(compacted segments, fragments) of the `files` table's one partition."""
    names = [p.name for p in Path(partition_dir(str(root), "files", "stt", "2026-12-01")).glob(
        "*.parquet")]
    segments = sum(name.startswith(SEGMENT_PREFIX) for name in names)
    return segments, len(names) - segments


async def test_once_the_listing_ends_what_was_written_is_compacted_while_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """The run's end used to compact every fragment of the run (200 per table at 5,000
    files); now it finds only those written after the listing ended, and no row is lost."""
    location = OutputLocation(root=str(tmp_path / "out"))
    before_end = MIN_FOLD_FRAGMENTS + 2
    async with ResultsWriter(
        location, "c", max_files=1, max_delay_s=0.0, compact_model="stt"
    ) as writer:
        for i in range(before_end):
            await writer.put(ledger_row(i), {})
        assert writer.folds == 0 and partition_files(tmp_path / "out") == (0, before_end)
        writer.listing_ended()
        await until(lambda: writer.folds == 1, what="a fold after the listing ended")
        for i in range(before_end, before_end + 3):
            await writer.put(ledger_row(i), {})
    assert partition_files(tmp_path / "out") == (1, 3)
    written = pd.read_parquet(table_dir(str(tmp_path / "out"), "files"))
    assert sorted(written.file_id) == [f"f{i:03d}" for i in range(before_end + 3)]


async def test_a_long_run_compacts_each_partition_every_fold_every_fragments(
    tmp_path: Path,
) -> None:
    location = OutputLocation(root=str(tmp_path / "out"))
    async with ResultsWriter(
        location, "c", max_files=1, max_delay_s=0.0, compact_model="stt", fold_every=4
    ) as writer:
        for i in range(4):
            await writer.put(ledger_row(i), {})
        await until(lambda: writer.folds == 1, what="a fold after fold_every fragments")
        assert partition_files(tmp_path / "out") == (1, 0)
        for i in range(4, 7):  # fewer than fold_every, and fewer than a fold at the end takes
            await writer.put(ledger_row(i), {})
        writer.listing_ended()
        await settle()
        assert writer.folds == 1 and partition_files(tmp_path / "out") == (1, 3)
