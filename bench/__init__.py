"""Benchmarks: our transcription flow against the vendor-docs script and a naive Prefect flow.

`uv run python -m bench` runs every contender on the same files
in one process tree and writes `bench/results/latest.json` (DESIGN.md section 6).
"""

# Before anything loads pyarrow: store/__init__.py picks arrow's allocator as it does in a
# flow run's process, so every bench measures the allocator production runs with.
import store  # noqa: E402, F401
