"""`python -m bench [--files N] [--quick]`: run the benchmark and print the report."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

# Mirrors bench.run.ORGS, which cannot be imported before configure_environment().
CONTENDERS = ("ours-small", "ours", "plain-small", "plain", "floor", "naive")
MODES = ("mixed", "evidence", "shared", "workers")
# "workers" starts PostgreSQL (installing it if missing) and two Prefect servers: only
# when asked for (`--only workers`), never in the default run or CI's quick one.
DEFAULT = (*CONTENDERS, "mixed", "evidence", "shared")
QUICK_DEFAULT = (*CONTENDERS, "mixed", "evidence")

__all__ = ["configure_environment", "main"]


def configure_environment() -> None:
    """Settings Prefect reads at import: no telemetry (no internet here), and WARNING logs,
    since the naive baseline would print two lines per file (the same for every contender)."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments, then import Prefect (its settings are read at import time)."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--files", type=int, default=None, help="files (default 5000)")
    parser.add_argument("--naive-files", type=int, default=None, help="files for baseline b")
    parser.add_argument("--quick", action="store_true", help="200 files, baseline b on 50")
    parser.add_argument("--chunk-size", type=int, default=None, help="our flow's chunk_size")
    parser.add_argument("--output", type=Path, default=None, help="JSON path")
    parser.add_argument("--mixed-files", type=int, default=None,
                        help="calls in the mixed-length mode (default 1000)")
    parser.add_argument(
        "--only", action="append", choices=CONTENDERS + MODES, default=None,
        help="run only this contender or mode (repeatable; the contenders' targets need "
        "all of them)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None,
        help="cProfile our flow's runs into <PROFILE>-<contender>.prof (slows them down)",
    )
    args = parser.parse_args(argv)
    configure_environment()
    from bench import evidence
    from bench.mixed import MIXED_FILES, QUICK_MIXED_FILES
    from bench.run import DEFAULT_FILES, DEFAULT_NAIVE_FILES, QUICK, RESULTS, run_bench

    files = args.files or (QUICK["files"] if args.quick else DEFAULT_FILES)
    naive = args.naive_files or (QUICK["naive_files"] if args.quick else DEFAULT_NAIVE_FILES)
    mixed = args.mixed_files or (QUICK_MIXED_FILES if args.quick else MIXED_FILES)
    run_bench(files=files, naive_files=naive, chunk_size=args.chunk_size,
              output=args.output or RESULTS,
              only=frozenset(args.only or (QUICK_DEFAULT if args.quick else DEFAULT)),
              profile=args.profile, mixed_files=mixed, quick=args.quick,
              evidence_files=evidence.QUICK_FILES if args.quick else evidence.FILES)


if __name__ == "__main__":
    main()
