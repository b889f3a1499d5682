"""`modulate-flows blocks`: register our block types, and create the blocks from the environment.

`from-env` is how a deployment gets its settings without anyone pasting keys into the
UI: a CI job or a container start-up exports the variables and runs it once. It prints
block names and the variables it read, never a value.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import typer

from modulate_flows.console import make_console, print_rows
from modulate_flows.prefect_api import connect_or_exit

__all__ = ["PlannedBlock", "blocks_app", "plan_from_env"]

DEFAULT_BLOCK_NAME = "modulate"
DEFAULT_BUCKET_BLOCK_NAME = "audio-inbox"

blocks_app = typer.Typer(help="The Prefect blocks a deployment uses.", no_args_is_help=True)
console = make_console()


@dataclass
class PlannedBlock:
    """A block built from the environment, the name to save it under, and the variables used."""

    name: str
    block: object  # a prefect Block; typed loosely so this module imports Prefect lazily
    variables: list[str]


@blocks_app.command("register")
def register() -> None:
    """Register the block types with the Prefect server (as `prefect block register -m blocks`)."""
    connect_or_exit(console)
    from prefect_aws import AwsCredentials, S3Bucket

    import blocks

    types = [getattr(blocks, name) for name in blocks.__all__ if name != "ModelLimit"]
    types += [AwsCredentials, S3Bucket]

    async def run() -> None:
        for block_type in types:
            await block_type.aregister_type_and_schema()

    asyncio.run(run())
    for block_type in types:
        console.print(f"registered {block_type.get_block_type_name()}")


@blocks_app.command("from-env")
def from_env(
    name: Annotated[
        str, typer.Option(help="Name to save the Modulate blocks under.")
    ] = DEFAULT_BLOCK_NAME,
    bucket_block: Annotated[
        str, typer.Option(help="Name to save the input S3 Bucket block under.")
    ] = DEFAULT_BUCKET_BLOCK_NAME,
    overwrite: Annotated[bool, typer.Option(help="Replace blocks that already exist.")] = True,
) -> None:
    """Create the blocks from environment variables; a block whose variables are unset is skipped.

    Variables: MODULATE_API_KEY, MODULATE_BASE_URL, MODULATE_ORG, MODULATE_LIMITS (JSON),
    MODULATE_PLATFORM_ACCOUNT_UUID, MODULATE_PLATFORM_API_KEY, MODULATE_PLATFORM_BASE_URL,
    MODULATE_OUTPUT_ROOT, MODULATE_INPUT_BUCKET, MODULATE_S3_ENDPOINT_URL, and AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION for S3.
    """
    import os

    try:
        planned = plan_from_env(os.environ, name=name, bucket_block=bucket_block)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if not planned:
        console.print("[red]No block variables set.[/red] Set e.g. MODULATE_API_KEY.")
        raise typer.Exit(1)

    connect_or_exit(console)

    async def save() -> None:
        for item in planned:
            await item.block.asave(item.name, overwrite=overwrite)  # type: ignore[attr-defined]

    asyncio.run(save())
    rows = [
        (
            item.block.get_block_type_name(),  # type: ignore[attr-defined]
            item.name,
            ", ".join(item.variables),
        )
        for item in planned
    ]
    print_rows(console, "Blocks saved", ("block type", "name", "from"), rows, wide=("from",))
    if any(type(item.block).__name__ == "OrgLimits" for item in planned):
        console.print("Run `modulate-flows limits sync` to apply the limits to Prefect.")


def plan_from_env(
    env: Mapping[str, str],
    *,
    name: str = DEFAULT_BLOCK_NAME,
    bucket_block: str = DEFAULT_BUCKET_BLOCK_NAME,
) -> list[PlannedBlock]:
    """Build (without saving) every block whose variables are set.

    Raises ValueError, naming the variable and never its value, when one is set without
    its partner or cannot be parsed.
    """
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
    from pydantic import SecretStr, TypeAdapter, ValidationError

    from blocks import (
        ModelLimit,
        ModulateCredentials,
        OrgLimits,
        ParquetOutput,
        PlatformCredentials,
    )

    def get(var: str) -> str | None:
        return env.get(var) or None

    def used(*names: str) -> list[str]:
        return [n for n in names if get(n)]

    planned: list[PlannedBlock] = []
    if key := get("MODULATE_API_KEY"):
        extra = {"base_url": url} if (url := get("MODULATE_BASE_URL")) else {}
        block = ModulateCredentials(api_key=SecretStr(key), **extra)
        planned.append(PlannedBlock(name, block, used("MODULATE_API_KEY", "MODULATE_BASE_URL")))

    org, limits_json = get("MODULATE_ORG"), get("MODULATE_LIMITS")
    if limits_json and not org:
        raise ValueError("MODULATE_LIMITS is set but MODULATE_ORG is not.")
    if org:
        try:
            models = TypeAdapter(dict[str, ModelLimit]).validate_python(
                json.loads(limits_json or "{}")
            )
            block = OrgLimits(organization=org, models=models)
        except (json.JSONDecodeError, ValidationError) as exc:
            raise ValueError(f"MODULATE_ORG or MODULATE_LIMITS is not valid: {exc}") from None
        planned.append(PlannedBlock(name, block, used("MODULATE_ORG", "MODULATE_LIMITS")))

    account, platform_key = get("MODULATE_PLATFORM_ACCOUNT_UUID"), get("MODULATE_PLATFORM_API_KEY")
    if bool(account) != bool(platform_key):
        raise ValueError(
            "Set both MODULATE_PLATFORM_ACCOUNT_UUID and MODULATE_PLATFORM_API_KEY, or neither."
        )
    if account and platform_key:
        extra = {"base_url": url} if (url := get("MODULATE_PLATFORM_BASE_URL")) else {}
        block = PlatformCredentials(account_uuid=account, api_key=SecretStr(platform_key), **extra)
        planned.append(
            PlannedBlock(
                name,
                block,
                used(
                    "MODULATE_PLATFORM_ACCOUNT_UUID",
                    "MODULATE_PLATFORM_API_KEY",
                    "MODULATE_PLATFORM_BASE_URL",
                ),
            )
        )

    aws_vars = (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "MODULATE_S3_ENDPOINT_URL",
    )
    secret = get("AWS_SECRET_ACCESS_KEY")
    # Unset keys leave boto3 to its default chain (instance role, ~/.aws), as in production.
    aws = AwsCredentials(
        aws_access_key_id=get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=SecretStr(secret) if secret else None,
        aws_session_token=get("AWS_SESSION_TOKEN"),
        region_name=get("AWS_REGION") or get("AWS_DEFAULT_REGION"),
        aws_client_parameters=AwsClientParameters(endpoint_url=get("MODULATE_S3_ENDPOINT_URL")),
    )
    if root := get("MODULATE_OUTPUT_ROOT"):
        is_s3 = root.startswith("s3://")
        block = ParquetOutput(root=root, aws_credentials=aws if is_s3 else None)
        variables = ["MODULATE_OUTPUT_ROOT", *(used(*aws_vars) if is_s3 else [])]
        planned.append(PlannedBlock(name, block, variables))
    if bucket := get("MODULATE_INPUT_BUCKET"):
        block = S3Bucket(bucket_name=bucket, credentials=aws)
        variables = ["MODULATE_INPUT_BUCKET", *used(*aws_vars)]
        planned.append(PlannedBlock(bucket_block, block, variables))
    return planned
