"""Our blocks pass Prefect's block standards; `modulate-flows blocks` registers and creates them."""

from __future__ import annotations

import asyncio

import pytest
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect_aws import S3Bucket
from typer.testing import CliRunner

import blocks
from blocks import ModulateCredentials, OrgLimits, ParquetOutput, PlatformCredentials
from modulate_flows.cli import app

BLOCKS = [getattr(blocks, name) for name in blocks.__all__ if name != "ModelLimit"]
SECRET_KEY = "velma-secret-canary-1234"
SECRET_PLATFORM = "platform-secret-canary-5678"
SECRET_AWS = "aws-secret-canary-9012"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
class TestAllBlocksAdhereToStandards(BlockStandardTestSuite):
    @pytest.fixture
    def block(self, block: type[Block]) -> type[Block]:
        return block

    @pytest.mark.skip(reason="downloads the logo image; our blocks have none")
    def test_has_a_valid_image(self, block: type[Block]) -> None:
        pass


def test_every_block_is_covered() -> None:
    found = {
        obj for obj in vars(blocks).values() if isinstance(obj, type) and Block.is_block_class(obj)
    }
    assert found == set(BLOCKS) and len(BLOCKS) == 4


def test_register_creates_the_block_types(prefect_server: None) -> None:
    result = CliRunner().invoke(app, ["blocks", "register"])
    assert result.exit_code == 0, result.output
    for block in BLOCKS:
        assert block.get_block_type_name() in result.output

    async def slugs() -> set[str]:
        async with get_client() as client:
            return {
                (await client.read_block_type_by_slug(b.get_block_type_slug())).slug
                for b in [*BLOCKS, S3Bucket]
            }

    assert asyncio.run(slugs()) == {b.get_block_type_slug() for b in [*BLOCKS, S3Bucket]}


def test_from_env_saves_every_block_and_prints_no_secret(prefect_server: None) -> None:
    env = {
        "MODULATE_API_KEY": SECRET_KEY,
        "MODULATE_BASE_URL": "http://127.0.0.1:9",
        "MODULATE_ORG": "acme",
        "MODULATE_LIMITS": '{"stt": {"concurrent": 5, "monthly_audio_hours": 100}}',
        "MODULATE_PLATFORM_ACCOUNT_UUID": "00000000-0000-4000-8000-000000000099",
        "MODULATE_PLATFORM_API_KEY": SECRET_PLATFORM,
        "MODULATE_OUTPUT_ROOT": "s3://lake/modulate",
        "MODULATE_INPUT_BUCKET": "calls",
        "MODULATE_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_ACCESS_KEY_ID": "AKIATEST",
        "AWS_SECRET_ACCESS_KEY": SECRET_AWS,
        "AWS_REGION": "eu-west-1",
    }
    result = CliRunner(env=env).invoke(app, ["blocks", "from-env", "--name", "fromenv"])
    assert result.exit_code == 0, result.output
    for secret in (SECRET_KEY, SECRET_PLATFORM, SECRET_AWS):
        assert secret not in result.output

    credentials = ModulateCredentials.load("fromenv")
    assert credentials.api_key.get_secret_value() == SECRET_KEY
    assert credentials.base_url == "http://127.0.0.1:9"
    limits = OrgLimits.load("fromenv")
    assert limits.organization == "acme"
    assert limits.for_model("stt").concurrent == 5
    assert limits.for_model("stt").monthly_audio_hours == 100
    platform = PlatformCredentials.load("fromenv")
    assert platform.api_key.get_secret_value() == SECRET_PLATFORM
    location = ParquetOutput.load("fromenv").location()
    assert location.root == "s3://lake/modulate"
    assert location.s3_endpoint_url == "http://127.0.0.1:9000"
    bucket = S3Bucket.load("audio-inbox")
    assert bucket.bucket_name == "calls"
    assert bucket.credentials.region_name == "eu-west-1"
    assert bucket.credentials.aws_secret_access_key.get_secret_value() == SECRET_AWS


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODULATE_LIMITS": "{}"}, "MODULATE_ORG is not"),
        ({"MODULATE_PLATFORM_API_KEY": SECRET_PLATFORM}, "MODULATE_PLATFORM_ACCOUNT_UUID"),
        ({"MODULATE_ORG": "acme", "MODULATE_LIMITS": '{"stt": {"concurrent": 0}}'}, "not valid"),
        ({}, "No block variables set"),
    ],
)
def test_from_env_refuses_incomplete_settings(env: dict[str, str], message: str) -> None:
    cleared = {
        var: ""
        for var in (
            "MODULATE_API_KEY",
            "MODULATE_ORG",
            "MODULATE_OUTPUT_ROOT",
            "MODULATE_INPUT_BUCKET",
            "MODULATE_PLATFORM_ACCOUNT_UUID",
            "MODULATE_PLATFORM_API_KEY",
            "MODULATE_LIMITS",
        )
    }
    result = CliRunner(env=cleared | env).invoke(app, ["blocks", "from-env"])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split())
    assert SECRET_PLATFORM not in result.output


def test_parquet_output_keeps_the_session_token_of_sts_credentials(services) -> None:
    """STS and SSO credentials carry a session token; the output location must pass it on."""
    from store import read_table, write_fragment

    creds = services.aws_credentials().model_copy(update={"aws_session_token": "sts-canary"})
    location = ParquetOutput(root="s3://sts-out/tables", aws_credentials=creds).location()
    assert location.aws_session_token.get_secret_value() == "sts-canary"  # type: ignore[union-attr]
    assert "sts-canary" not in repr(location)
    services.upload("sts-out", {})
    write_fragment(location, "files", [], fragment_id="empty")  # nothing to write is fine
    filesystem, _ = location.filesystem()
    assert filesystem.__reduce__()[1][0]["session_token"] == "sts-canary"
    assert read_table(location, "files").num_rows == 0
