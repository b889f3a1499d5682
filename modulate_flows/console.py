"""The CLI's console and tables: readable when piped, in a log, or in a narrow terminal.

rich sizes output to 80 columns when stdout is not a terminal, which folded the demo's
"why" column into a word per line. Piped output gets a wider page instead (COLUMNS still
wins), and a table that would not fit is printed as one block per row.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

__all__ = ["PIPED_WIDTH", "VERTICAL_BELOW", "make_console", "print_rows"]

PIPED_WIDTH = 160  # wide enough for a table of error details; log viewers scroll sideways
VERTICAL_BELOW = 72  # narrower than this, tables become one block per row


def make_console() -> Console:
    """A console that keeps its terminal's width, and a wide page when piped."""
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(width=PIPED_WIDTH if piped else None)


def print_rows(
    console: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    wide: Sequence[str] = (),
    numeric: Sequence[str] = (),
) -> None:
    """Print rows as a table, or one block per row where the console is too narrow.

    `wide` names the free-text columns: they fold (break long words) rather than force
    the other columns narrow; every other column is kept on one line. `numeric` columns
    are right-aligned.
    """
    if console.width < VERTICAL_BELOW:
        console.print(f"[bold]{title}[/bold]")
        for row in rows:
            head, *rest = row
            console.print(f"- {head}", highlight=False)
            for column, value in zip(columns[1:], rest, strict=True):
                if value:
                    console.print(f"    {column}: {value}", highlight=False, overflow="fold")
        return
    # Rows whose text folds over several lines need a rule between them to be read.
    table = Table(title=title, show_lines=bool(wide))
    for column in columns:
        if column in wide:
            table.add_column(column, overflow="fold")
        else:
            justify = "right" if column in numeric else "left"
            table.add_column(column, no_wrap=True, justify=justify)
    for row in rows:
        table.add_row(*row)
    console.print(table)
