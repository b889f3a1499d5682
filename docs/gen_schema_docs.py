"""Generate the column tables of docs/data.md from store/tables.py, the one source of the schemas.

    uv run python docs/gen_schema_docs.py           # rewrite the generated part of docs/data.md
    uv run python docs/gen_schema_docs.py --check   # exit 1 if docs/data.md is out of date

tests/test_data_guide.py runs the check, so a column added to a schema without regenerating
the guide fails the tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa

from store.tables import DESCRIPTION_KEY, PARTITION_COLUMNS, SCHEMA_VERSION, TABLES

__all__ = ["BEGIN", "DATA_MD", "END", "render_tables", "update"]

DATA_MD = Path(__file__).with_name("data.md")
BEGIN = "<!-- BEGIN GENERATED TABLES (docs/gen_schema_docs.py) -->"
END = "<!-- END GENERATED TABLES -->"

# What one row of each table is; the columns' meanings come from the schemas themselves.
TABLE_ROWS: dict[str, str] = {
    "files": "one input object version per job config: the ledger of what was sent and how it "
    "ended. Every batch flow writes it.",
    "transcripts": "one transcript per file (Velma-2 STT `stt`, English VFast `vfast`, and the "
    "redaction flow's transcript `pii`).",
    "utterances": "one utterance of a transcript (`stt` only; VFast returns text only).",
    "detections": "one 4-second frame of synthetic-voice detection (`svd`).",
    "detection_summary": "one synthetic-voice verdict per file (`svd`).",
    "redactions": "one redacted file (`pii`): redacted text, redacted time ranges, MP3 location.",
    "platform_results": "one file of a Modulate Platform API job (`platform`).",
    "usage": "one completed call and the audio it was charged, under the model whose monthly "
    "limit it used and the day it finished (see Monthly audio hours).",
}


def render_tables() -> str:
    """The Markdown of every table: what a row is, its key, and each column's type and meaning."""
    missing = sorted(set(TABLES) - set(TABLE_ROWS))
    if missing:
        raise ValueError(f"docs/gen_schema_docs.py has no row description for {missing}")
    parts = [
        f"Schema version {SCHEMA_VERSION}. Types are Arrow types as stored in the Parquet files; "
        f"the partition columns {', '.join(f'`{c}`' for c in PARTITION_COLUMNS)} live in the "
        "directory names (see Partitioning for how each reader types them).\n"
    ]
    for name, (schema, key) in TABLES.items():
        parts.append(f"### `{name}`\n")
        parts.append(f"A row is {TABLE_ROWS[name]} Key: {', '.join(f'`{k}`' for k in key)}.\n")
        parts.append("| column | type | null | meaning |\n|---|---|---|---|")
        for field in schema:
            parts.append(
                f"| `{field.name}` | {_type_name(field.type)} | "
                f"{'yes' if field.nullable else 'no'} | {_description(field)} |"
            )
        parts.append("")
    return "\n".join(parts)


def update(text: str) -> str:
    """Return ``text`` with the part between the markers replaced by freshly rendered tables."""
    head, found, rest = text.partition(BEGIN)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"docs/data.md lacks the markers {BEGIN!r} ... {END!r}")
    return f"{head}{BEGIN}\n{render_tables()}{END}{tail}"


def _type_name(type_: pa.DataType) -> str:
    # In backticks so nested types (list<item: struct<...>>) render as written.
    return f"`{type_}`"


def _description(field: pa.Field) -> str:
    raw = (field.metadata or {}).get(DESCRIPTION_KEY, b"")
    return raw.decode().replace("|", "\\|")


def main(argv: list[str]) -> int:
    current = DATA_MD.read_text()
    fresh = update(current)
    if "--check" in argv:
        if fresh != current:
            print("docs/data.md is out of date: run uv run python docs/gen_schema_docs.py")
            return 1
        return 0
    DATA_MD.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
