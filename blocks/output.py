"""Where a run's Parquet goes: a local directory or an S3 prefix."""

from __future__ import annotations

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field

from store.location import OutputLocation

__all__ = ["ParquetOutput"]


class ParquetOutput(Block):
    """The root of the Hive-partitioned Parquet tables (files, transcripts, utterances, ...).

    Example:
        ```python
        from blocks import ParquetOutput

        output = ParquetOutput.load("BLOCK_NAME")
        location = output.location()
        ```
    """

    _block_type_name = "Modulate Parquet Output"
    _block_type_slug = "modulate-parquet-output"
    _documentation_url = "https://gh.649446.xyz/modulate-flows/modulate-flows#the-parquet-tables"

    root: str = Field(
        default=...,
        title="Root",
        description="A local directory, or s3://bucket/prefix for object storage.",
    )
    aws_credentials: AwsCredentials | None = Field(
        default=None,
        title="AWS credentials",
        description="Credentials (and endpoint override) for an s3:// root.",
    )

    def location(self) -> OutputLocation:
        """The output location with its filesystem settings."""
        creds = self.aws_credentials
        if creds is None:
            return OutputLocation(root=self.root)
        secret = creds.aws_secret_access_key
        return OutputLocation(
            root=self.root,
            s3_endpoint_url=creds.aws_client_parameters.endpoint_url,
            aws_access_key_id=creds.aws_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            aws_session_token=creds.aws_session_token,
            region=creds.region_name or "us-east-1",
        )
