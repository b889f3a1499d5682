"""The state layer: plain pyarrow tables, ledger and job records, with no Prefect in it."""
