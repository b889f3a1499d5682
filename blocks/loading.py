"""Load the blocks a run needs, failing at once with what is missing and the command that makes it.

Prefect's own error for a missing block ("Unable to find block document named modulate for
block type modulate-org-limits") says neither which setting names it nor how to create it.
`load_blocks` loads several at once and names every one that is missing in one message.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar, overload

from prefect.blocks.core import Block
from pydantic import ValidationError

__all__ = ["BlockNotLoaded", "create_hint", "load_block", "load_blocks"]

A = TypeVar("A", bound=Block)
B = TypeVar("B", bound=Block)
C = TypeVar("C", bound=Block)
D = TypeVar("D", bound=Block)

# How each of our block types is made (keyed by block type slug); the variables are those
# `modulate-flows blocks from-env` reads (modulate_flows/blocks_cli.py, keep in sync).
_FROM_ENV = {
    "modulate-credentials": "MODULATE_API_KEY (and MODULATE_BASE_URL)",
    "modulate-platform-credentials": "MODULATE_PLATFORM_ACCOUNT_UUID and MODULATE_PLATFORM_API_KEY",
    "modulate-org-limits": "MODULATE_ORG and MODULATE_LIMITS",
    "modulate-parquet-output": "MODULATE_OUTPUT_ROOT",
    "s3-bucket": "MODULATE_INPUT_BUCKET (and AWS_* / MODULATE_S3_ENDPOINT_URL)",
}


class BlockNotLoaded(LookupError):
    """One or more blocks are missing or cannot be loaded; the message says how to fix each."""


def create_hint(block_type: type[Block], name: str) -> str:
    """The commands that create a block of this type under `name`."""
    slug = block_type.get_block_type_slug()
    option = "--bucket-block" if slug == "s3-bucket" else "--name"
    hint = (
        f"`modulate-flows blocks register`, then set {_FROM_ENV.get(slug, 'its variables')} and "
        f"run `modulate-flows blocks from-env {option} {name}` (or create it in the Prefect UI)"
    )
    if slug == "modulate-org-limits":
        hint += f", then `modulate-flows limits sync --block {name}`"
    return hint


async def load_block(block_type: type[A], name: str) -> A:
    """Load one block; raise BlockNotLoaded naming it, its type and how to create it."""
    title = block_type.get_block_type_name()
    try:
        return await block_type.aload(name)
    except ValueError:  # Prefect's "Unable to find block document named ..."
        problem = f"The {title} block {name!r} does not exist"
    except RuntimeError as exc:  # Prefect's "... due to failed validation", from pydantic's
        if not isinstance(exc.__cause__, ValidationError):
            raise
        problem = (
            f"The {title} block {name!r} exists but does not load ({_reason(exc.__cause__)})"
        )
    raise BlockNotLoaded(f"{problem}. Create it: {create_hint(block_type, name)}.") from None


def _reason(exc: ValidationError) -> str:
    """Why a document does not validate: field and message, never the value (it may be a key)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
        for error in exc.errors(include_input=False, include_url=False)
    )


@overload
async def load_blocks(a: tuple[type[A], str], b: tuple[type[B], str], /) -> tuple[A, B]: ...
@overload
async def load_blocks(
    a: tuple[type[A], str], b: tuple[type[B], str], c: tuple[type[C], str], /
) -> tuple[A, B, C]: ...
@overload
async def load_blocks(
    a: tuple[type[A], str],
    b: tuple[type[B], str],
    c: tuple[type[C], str],
    d: tuple[type[D], str],
    /,
) -> tuple[A, B, C, D]: ...
async def load_blocks(*wanted: tuple[type[Any], str]) -> tuple[Any, ...]:
    """Load several blocks at once (one server round trip's wait); name every one that fails."""
    loaded = await asyncio.gather(
        *(load_block(block_type, name) for block_type, name in wanted), return_exceptions=True
    )
    failures = [str(item) for item in loaded if isinstance(item, BlockNotLoaded)]
    if failures:
        raise BlockNotLoaded("\n".join(failures))
    for item in loaded:
        if isinstance(item, BaseException):
            raise item
    return tuple(loaded)
