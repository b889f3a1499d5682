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

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["child_winners", "files_winners", "last_of_each", "rank_order"]

COMPLETED = "completed"
NO_TIME = -1


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
    winners, latest = last_of_each(rank_order(table, tie_breaks), group, also_max="_finished")
    return winners.append_column("_latest", latest)


def last_of_each(
    ranked: pa.Table, group: Sequence[str], also_max: str | None = None
) -> tuple[pa.Table, pa.ChunkedArray | None]:
    """The last row of each ``group`` key of ``ranked`` (sorted already), and, aligned with
    those rows, the greatest ``also_max`` of each key when asked."""
    numbered = ranked.append_column("_pos", pa.array(range(ranked.num_rows), pa.int64()))
    aggregates = [("_pos", "max"), *([(also_max, "max")] if also_max else [])]
    grouped = numbered.group_by(list(group), use_threads=False).aggregate(aggregates)
    greatest = grouped[f"{also_max}_max"] if also_max else None
    return ranked.take(grouped["_pos_max"]), greatest


def child_winners(ledger: pa.Table, attempts: pa.Table) -> pa.Table:
    """Which attempt's rows each key keeps in a child table, and from which source file.

    In arrow, not per key in Python: a first compaction of 100k files held ~145 MB of tuples,
    dicts and strings for this (BENCHMARKS.md).

    Args:
        ledger: the ``files`` winners of the keys the ledger knows: ``_gk`` (the key),
            ``_attempt``, ``_completed``, ``_finished`` and ``_latest`` (files_winners' names).
        attempts: ``_gk``, ``_attempt``, ``_source`` and ``_written`` (ns) for every attempt
            found in the child table's inputs; ``_source`` orders the input files, the latest
            greatest.

    Returns:
        One row of ``attempts`` per key that keeps rows; a key missing from it keeps none (its
        winner did not complete, or completed without rows in this table).
    """
    known = ledger.select(["_gk", "_attempt", "_completed", "_finished", "_latest"])
    known = known.rename_columns(["_gk", "_l_attempt", "_l_completed", "_l_finished", "_l_latest"])
    joined = attempts.join(known, "_gk", join_type="left outer", use_threads=False)
    has = pc.is_valid(joined["_l_attempt"])
    matched = pc.fill_null(pc.equal(joined["_attempt"], joined["_l_attempt"]), False)
    # The ledger's own attempt counts only if it completed; an attempt the ledger never
    # heard of, written before the key's latest finish, was superseded since.
    failed = pc.fill_null(pc.and_(matched, pc.not_equal(joined["_l_completed"], 1)), False)
    superseded = pc.fill_null(
        pc.and_(
            pc.and_(has, pc.invert(matched)),
            pc.less_equal(joined["_written"], joined["_l_latest"]),
        ),
        False,
    )
    # Pending (not in the ledger yet): ranked by when its rows were written.
    rank = pc.if_else(matched, joined["_l_finished"], joined["_written"])
    ranked = joined.select(["_gk", "_attempt", "_source"]).append_column("_rank", rank)
    ranked = ranked.filter(pc.invert(pc.or_(failed, superseded))).sort_by(
        [("_rank", "ascending"), ("_attempt", "ascending"), ("_source", "ascending")]
    )
    best, _ = last_of_each(ranked, ["_gk"])
    return best.select(["_gk", "_attempt", "_source"])
