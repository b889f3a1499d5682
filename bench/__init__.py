"""Benchmarks: our transcription flow against the vendor-docs script and a naive Prefect flow.

`uv run python -m bench` runs every contender on the same files
in one process tree and writes `bench/results/latest.json` (DESIGN.md section 6).
"""
