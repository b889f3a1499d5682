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

from store.compaction import compact
from store.fragments import read_table, write_fragment
from store.ledger import LedgerLookup, read_ledger
from store.location import OutputLocation

__all__ = [
    "LedgerLookup",
    "OutputLocation",
    "compact",
    "read_ledger",
    "read_table",
    "write_fragment",
]
