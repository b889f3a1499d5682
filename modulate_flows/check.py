"""`modulate-flows check`: everything a run needs, one row a check, with what to do if it fails.

In the spirit of `dbt debug`. Each check is bounded in time and touches nothing a run
would pay for:

* the Modulate key: the STT streaming WebSocket is opened and at once ended with the
  empty text frame, no audio sent. The key travels in the URL and the contract says a bad
  one is refused at the handshake (close 4001/4003) whatever else the request holds; the
  order in which the batch endpoints check the key and the body is not documented, so an
  empty batch upload refused with 400 would prove nothing. Cost: one stream slot of
  `stt-streaming` for a round trip, 0 audio seconds.
* the Platform credentials: the status of a made-up job id; "not found" (404) means the
  credentials passed, 401/403 that they did not. Cost: one GET, no job.
* the output root: a probe object is written and deleted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from rich.markup import escape

from modulate_flows.blocks_cli import DEFAULT_BLOCK_NAME, DEFAULT_BUCKET_BLOCK_NAME

__all__ = [
    "CHECK_TIMEOUT_SECONDS",
    "COUNT_CAP",
    "OK",
    "FAIL",
    "SKIP",
    "WARN",
    "Check",
    "CheckTargets",
    "KEY_PROBE",
    "rows_for_table",
    "run_checks",
]

CHECK_TIMEOUT_SECONDS = 20.0  # each network check; a service slower than this fails the row
COUNT_CAP = 1000  # objects counted under the prefix; beyond it the row says "at least"
KEY_PROBE = (
    "STT streaming handshake ended before any audio (0 audio seconds; one stt-streaming slot "
    "for a moment)"
)
PLATFORM_PROBE = "job_status of a made-up job id (one GET; no job is created)"
OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skipped"
_PROBE_BYTES = b"modulate-flows check: a write probe, deleted at once\n"


@dataclass(frozen=True)
class CheckTargets:
    """The block names and the input selection to check (the flows' defaults)."""

    credentials: str = DEFAULT_BLOCK_NAME
    limits: str = DEFAULT_BLOCK_NAME
    output: str = DEFAULT_BLOCK_NAME
    bucket: str = DEFAULT_BUCKET_BLOCK_NAME
    prefix: str = ""
    pattern: str = "*"
    platform_credentials: str | None = None  # None: checked if the default block exists


@dataclass
class Check:
    """One row: what was checked, how it went, what was seen, what to do."""

    name: str
    status: str
    detail: str
    fix: str = ""


async def run_checks(targets: CheckTargets) -> list[Check]:
    """Run every check after the Prefect API is reachable; return one row each."""
    from prefect_aws import S3Bucket

    from blocks import ModulateCredentials, OrgLimits, ParquetOutput, PlatformCredentials

    wanted: list[tuple[str, type[Any], str, bool]] = [
        ("credentials", ModulateCredentials, targets.credentials, True),
        ("limits", OrgLimits, targets.limits, True),
        ("output", ParquetOutput, targets.output, True),
        ("bucket", S3Bucket, targets.bucket, True),
        (
            "platform",
            PlatformCredentials,
            targets.platform_credentials or DEFAULT_BLOCK_NAME,
            targets.platform_credentials is not None,
        ),
    ]
    loaded: dict[str, Any] = {}
    rows = [await _block_row(loaded, *item) for item in wanted]
    probes: list[Awaitable[list[Check]]] = [
        _limits_rows(loaded.get("limits"), targets.limits),
        _bounded("input bucket", _bucket_row, loaded.get("bucket"), targets),
        _bounded("output root", _output_row, loaded.get("output"), targets),
        _bounded("Modulate key", _key_row, loaded.get("credentials"), targets),
        _bounded("Platform credentials", _platform_row, loaded.get("platform"), targets),
    ]
    for found in await asyncio.gather(*probes):
        rows += found
    return rows


async def _block_row(
    loaded: dict[str, Any], role: str, block_type: type[Any], name: str, required: bool
) -> Check:
    from blocks.loading import BlockNotLoaded, load_block

    title = f"block {block_type.get_block_type_name()} {name!r}"
    try:
        block = await load_block(block_type, name)
    except BlockNotLoaded as exc:
        if not required and "does not exist" in str(exc):
            return Check(title, SKIP, "not set; only the Platform flow needs it")
        problem, _, fix = str(exc).partition(". Create it: ")
        return Check(title, FAIL, problem, f"Create it: {fix}" if fix else "")
    loaded[role] = block
    return Check(title, OK, _describe(role, block))


def _describe(role: str, block: Any) -> str:
    """What a block holds, never a secret."""
    if role == "credentials":
        return f"base_url {block.base_url}; api_key set (hidden)"
    if role == "platform":
        return f"base_url {block.base_url}; account {block.account_uuid}; api_key set (hidden)"
    if role == "limits":
        models = ", ".join(f"{m} {v.concurrent}" for m, v in sorted(block.models.items()))
        return f"organization {block.organization}; at once: {models or 'no models declared'}"
    if role == "output":
        return f"root {block.root}"
    endpoint = block.credentials.aws_client_parameters.endpoint_url
    return f"bucket {block.bucket_name}" + (f" at {endpoint}" if endpoint else "")


async def _bounded(
    name: str,
    check: Callable[[Any, CheckTargets], Awaitable[Check]],
    block: Any,
    targets: CheckTargets,
) -> list[Check]:
    if block is None:
        return [Check(name, SKIP, "its block did not load (see above)")]
    try:
        return [await asyncio.wait_for(check(block, targets), CHECK_TIMEOUT_SECONDS)]
    except TimeoutError:
        return [
            Check(
                name,
                FAIL,
                f"no answer within {CHECK_TIMEOUT_SECONDS:.0f} s",
                "Check the endpoint in its block and the network path to it.",
            )
        ]


async def _limits_rows(limits: Any, block_name: str) -> list[Check]:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if limits is None:
        return [Check("concurrency limits", SKIP, "the limits block did not load (see above)")]
    sync = f"Run `modulate-flows limits sync --block {block_name}`."
    if not limits.models:
        return [
            Check(
                "concurrency limits",
                WARN,
                "the block declares no models: each run holds the default locally, "
                "and runs do not share a limit",
                f"Declare the org's models in the block (MODULATE_LIMITS), then: {sync}",
            )
        ]
    rows = []
    async with get_client() as client:
        for model, declared in sorted(limits.models.items()):
            name = limits.limit_name(model)
            try:
                found = await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                found = None
            if found is None:
                rows.append(Check(f"limit {name}", FAIL, "not in Prefect (not synced)", sync))
            elif not found.active:
                rows.append(Check(f"limit {name}", FAIL, "inactive in Prefect", sync))
            elif found.limit != declared.concurrent:
                detail = (
                    f"Prefect holds {found.limit} at once; the block says {declared.concurrent}"
                )
                rows.append(Check(f"limit {name}", FAIL, detail, sync))
            else:
                detail = f"{found.limit} at once, as the block says ({found.active_slots} in use)"
                rows.append(Check(f"limit {name}", OK, detail))
    return rows


async def _bucket_row(bucket: Any, targets: CheckTargets) -> Check:
    from botocore.exceptions import BotoCoreError, ClientError

    from tasks.s3 import S3Input, S3Listing

    where = f"s3://{bucket.bucket_name}/{targets.prefix}"
    selection = S3Input(
        bucket_block=targets.bucket,
        prefix=targets.prefix,
        pattern=targets.pattern,
        max_files=COUNT_CAP,
    )
    matched = 0
    try:
        s3_client = await asyncio.to_thread(bucket.credentials.get_s3_client)
        async for _ in S3Listing(s3_client, bucket.bucket_name, selection):
            matched += 1
    except (BotoCoreError, ClientError) as exc:
        return Check(
            "input bucket",
            FAIL,
            f"cannot list {where}: {exc}",
            f"Check the bucket name and credentials in the S3 Bucket block {targets.bucket!r} "
            "(they need s3:ListBucket and s3:GetObject; an endpoint override for MinIO goes "
            "in its AWS credentials' client parameters).",
        )
    count = f"at least {COUNT_CAP}" if matched >= COUNT_CAP else str(matched)
    detail = f"{count} objects match {targets.pattern!r} under {where}"
    if matched == 0:
        return Check("input bucket", WARN, detail, "Check --prefix and --pattern.")
    return Check("input bucket", OK, detail)


async def _output_row(parquet: Any, targets: CheckTargets) -> Check:
    location = parquet.location()
    probe = f"_modulate-check-{uuid.uuid4().hex}.probe"

    def write_and_delete() -> None:
        fs, base = location.filesystem()
        path = f"{base}/{probe}"
        with fs.open_output_stream(path) as out:
            out.write(_PROBE_BYTES)
        fs.delete_file(path)

    try:
        await asyncio.to_thread(write_and_delete)
    except (OSError, ValueError) as exc:  # pyarrow raises OSError for S3 errors too
        return Check(
            "output root",
            FAIL,
            f"cannot write under {location.root}: {exc}",
            f"Fix root (or its AWS credentials) in the Modulate Parquet Output block "
            f"{targets.output!r}: the directory or bucket must exist or be creatable, and be "
            "writable.",
        )
    return Check("output root", OK, f"wrote and deleted a probe object under {location.root}")


async def _key_row(credentials: Any, targets: CheckTargets) -> Check:
    from modulate import (
        AuthError,
        BadInput,
        ConcurrencyLimited,
        ModelNotEnabled,
        ModulateError,
        MonthlyLimitReached,
        StreamParams,
    )

    name = "Modulate key"
    fix = (
        f"Set a valid api_key in the Modulate Credentials block {targets.credentials!r} "
        f"(`modulate-flows blocks from-env --name {targets.credentials}` with MODULATE_API_KEY)."
    )
    try:
        await credentials.streaming_client().collect("stt", _no_audio(), StreamParams())
    except ModelNotEnabled as exc:
        return Check(
            name,
            FAIL,
            f"refused ({exc}): the key is invalid, or STT streaming is not enabled for its org "
            f"(the service uses one code for both). Probe: {KEY_PROBE}.",
            fix + " If the key is right, ask Modulate to enable STT streaming for the org.",
        )
    except AuthError as exc:
        return Check(name, FAIL, f"refused ({exc}). Probe: {KEY_PROBE}.", fix)
    except (ConcurrencyLimited, MonthlyLimitReached) as exc:
        if isinstance(exc, ConcurrencyLimited) and exc.access_suspect:
            # One probe has no evidence to weigh (a run's gate has): name all three causes.
            return Check(
                name,
                FAIL,
                f"refused ({exc}): the key is invalid, STT streaming is not enabled for its "
                f"org, or the org's limit is used up (the service answers all three alike). "
                f"Probe: {KEY_PROBE}.",
                fix + " If the key is right, ask Modulate whether STT streaming is enabled "
                "for the org and within its limits.",
            )
        return Check(
            name,
            WARN,
            f"the service knows the key but refused a stream now ({exc}): the org is at its "
            f"concurrent or monthly limit. Probe: {KEY_PROBE}.",
            "Check again when the org's runs are done, or see its usage with Modulate.",
        )
    except BadInput as exc:
        return Check(
            name, OK, f"accepted: the stream opened, then the empty stream was refused ({exc})"
        )
    except ModulateError as exc:
        return Check(
            name,
            FAIL,
            f"no answer from {credentials.base_url} ({exc})",
            f"Check base_url in the Modulate Credentials block {targets.credentials!r} and the "
            "network path to it.",
        )
    return Check(name, OK, f"accepted. Probe: {KEY_PROBE}.")


async def _platform_row(credentials: Any, targets: CheckTargets) -> Check:
    from modulate import AuthError, BadInput, ConcurrencyLimited, ModulateError, MonthlyLimitReached

    name = "Platform credentials"
    block = targets.platform_credentials or DEFAULT_BLOCK_NAME
    fix = (
        f"Set the account UUID and API key in the Modulate Platform Credentials block {block!r} "
        f"(`modulate-flows blocks from-env --name {block}` with MODULATE_PLATFORM_ACCOUNT_UUID "
        "and MODULATE_PLATFORM_API_KEY)."
    )
    async with credentials.platform_client() as client:
        try:
            await client.job_status(str(uuid.uuid4()))
        except AuthError as exc:
            return Check(name, FAIL, f"refused ({exc}). Probe: {PLATFORM_PROBE}.", fix)
        except (ConcurrencyLimited, MonthlyLimitReached) as exc:
            detail = f"known but limited now ({exc}). Probe: {PLATFORM_PROBE}."
            return Check(name, WARN, detail, "Check again later.")
        except BadInput:
            return Check(name, OK, f"accepted (unknown job: not found). Probe: {PLATFORM_PROBE}.")
        except ModulateError as exc:
            return Check(
                name,
                FAIL,
                f"no answer from {credentials.base_url} ({exc})",
                f"Check base_url in the Modulate Platform Credentials block {block!r}.",
            )
    return Check(name, OK, f"accepted. Probe: {PLATFORM_PROBE}.")


async def _no_audio() -> AsyncIterator[bytes]:
    return
    yield  # an async generator that yields nothing: the stream ends before any audio


def rows_for_table(checks: list[Check]) -> list[tuple[str, str, str, str]]:
    """The rows as the CLI prints them, markup escaped (details quote server messages)."""
    colour = {OK: "green", FAIL: "red", WARN: "yellow", SKIP: "dim"}
    return [
        (escape(c.name), f"[{colour[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
        for c in checks
    ]
