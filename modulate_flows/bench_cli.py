"""The `modulate-flows bench` command: the benchmark of bench/ behind the project's CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["bench"]


def bench(
    files: Annotated[int | None, typer.Option(min=1, help="Files (default 5000).")] = None,
    quick: Annotated[bool, typer.Option(help="200 files, baseline (b) on 25: for CI.")] = False,
    naive_files: Annotated[
        int | None, typer.Option(min=1, help="Files for the naive Prefect baseline (b).")
    ] = None,
    chunk_size: Annotated[int | None, typer.Option(min=1, help="Our flow's chunk_size.")] = None,
    output: Annotated[Path | None, typer.Option(help="Where the JSON goes.")] = None,
) -> None:
    """Benchmark the transcription flow against the vendor-docs script and a naive Prefect flow."""
    from bench.__main__ import main

    argv = ["--quick"] if quick else []
    for flag, value in (("--files", files), ("--naive-files", naive_files),
                        ("--chunk-size", chunk_size), ("--output", output)):
        if value is not None:
            argv += [flag, str(value)]
    main(argv)
