"""Which attempt of a file wins: the one rule the ledger lookup and compaction share.

For one file version under one config, ``(file_id, config_hash)``, every run that sent it
wrote one ``files`` row (its attempt, named by ``flow_run_id``). The winner is

1. a ``completed`` attempt over one that is not;
2. then the latest ``finished_at``;
3. then the greatest ``flow_run_id``, and the most recently written file, so that every
   reader of the same rows picks the same one.

A file's child rows (utterances, transcripts, detections, ...) follow it: compaction keeps
the rows whose ``flow_run_id`` is the winner's, and only if the winner completed. Rows of an
attempt the ledger does not know yet (its ``files`` row is written after its data rows) are
kept while they may still win: while they were written after every ``files`` row of the key.
An attempt that crashed between its data rows and its ledger row is superseded as soon as a
later attempt lands in the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["LedgerWinner", "child_winners", "files_winners", "rank_order"]

COMPLETED = "completed"
NO_TIME = -1


@dataclass(frozen=True)
class LedgerWinner:
    """The winning ``files`` attempt of a key, and the latest ``finished_at`` of any attempt."""

    attempt: str
    completed: bool
    finished_ns: int
    latest_finished_ns: int


def rank_order(table: pa.Table, tie_breaks: tuple[str, ...] = ()) -> pa.Table:
    """``table`` (status, finished_at, flow_run_id, ...) with the rank columns, sorted by rank.

    The last row of each key is its winner; ``tie_breaks`` are further ascending columns
    (the source file's order, a row's position in it).
    """
    ranked = table.append_column(
        "_completed", pc.equal(table["status"], COMPLETED).fill_null(False).cast(pa.int8())
    )
    # In nanoseconds, the unit of a fragment's written-at stamp it is compared with.
    micros = table["finished_at"].cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    finished = pc.fill_null(pc.multiply(micros, 1000), NO_TIME)
    ranked = ranked.append_column("_finished", finished)
    ranked = ranked.append_column("_attempt", pc.fill_null(table["flow_run_id"], ""))
    order = ["_completed", "_finished", "_attempt", *tie_breaks]
    return ranked.sort_by([(name, "ascending") for name in order])


def files_winners(table: pa.Table, group: tuple[str, ...], tie_breaks: tuple[str, ...] = ()):
    """The winning row of every key of ``files`` rows, plus each key's latest finished_at.

    Returns the winners' rows (with the rank columns and ``_latest``, the greatest
    ``_finished`` of the key).
    """
    ranked = rank_order(table, tie_breaks)
    ranked = ranked.append_column("_pos", pa.array(range(ranked.num_rows), pa.int64()))
    grouped = ranked.group_by(list(group), use_threads=False).aggregate(
        [("_pos", "max"), ("_finished", "max")]
    )
    winners = ranked.take(grouped["_pos_max"])
    return winners.append_column("_latest", grouped["_finished_max"])


def child_winners(
    ledger: dict[str, LedgerWinner], attempts: Iterable[tuple[str, str, int, int]]
) -> dict[str, tuple[str, int]]:
    """Which attempt's rows a key keeps in a child table, and from which source file.

    Args:
        ledger: key -> its ``files`` winner, for the keys the ledger knows.
        attempts: ``(key, attempt, source, written_ns)`` for every attempt found in the child
            table's inputs; ``source`` orders the input files, the latest greatest.

    Returns:
        key -> ``(attempt, source)``; a key missing from it keeps no rows (its winner
        did not complete, or completed without rows in this table).
    """
    best: dict[str, tuple[tuple[int, int, str, int], str, int]] = {}
    for key, attempt, source, written_ns in attempts:
        known = ledger.get(key)
        if known is not None and attempt == known.attempt:
            if not known.completed:
                continue
            rank = (1, known.finished_ns, attempt, source)
        elif known is not None and written_ns <= known.latest_finished_ns:
            continue  # an attempt the ledger never heard of, superseded since
        else:
            rank = (1, written_ns, attempt, source)  # pending: its ledger row follows
        if key not in best or rank > best[key][0]:
            best[key] = (rank, attempt, source)
    return {key: (attempt, source) for key, (_, attempt, source) in best.items()}
