"""The state layer: the Parquet tables, their fragments and compaction, the ledger and
the Platform job records.

Plain pyarrow, no Prefect: `tasks/` and `blocks/` import it, it imports neither.

* ``tables``: the schemas of every table, ids and hashes;
* ``location``: where the tables live (a directory or S3) and the partition layout;
* ``fragments``: writing rows as fragments that appear whole; reading a table back;
* ``winners``: which attempt of a file wins, the one rule both of the next two apply;
* ``ledger``: what a run's start-up reads of the ``files`` table, a partition at a time;
* ``compaction``: folding new fragments into segments with bounded memory;
* ``locks``: one compactor per partition at a time;
* ``job_records``: the Platform jobs a run created, by state (open, failed, closed).
"""

import os
import sys

# Arrow picks its allocator once, when pyarrow is first imported (here, in our processes).
# mimalloc, its default, kept what compaction's join and sort had freed: a 2M-row partition
# peaked at 292 MB; with the system allocator 217 MB, and no slower (bench/state.py,
# BENCHMARKS.md). A choice of the user's own (the variable set, pyarrow imported first) stands.
if "pyarrow" not in sys.modules:
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

from store.compaction import compact  # noqa: E402
from store.fragments import read_table, write_fragment  # noqa: E402
from store.ledger import LedgerLookup, read_ledger  # noqa: E402
from store.location import OutputLocation  # noqa: E402

__all__ = [
    "LedgerLookup",
    "OutputLocation",
    "compact",
    "read_ledger",
    "read_table",
    "write_fragment",
]
