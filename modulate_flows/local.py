"""A local stand-in for the cloud: moto S3, the emulator, and blocks that point at them.

The demo, the tests and the benchmark all run on this, on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import boto3
from moto.server import ThreadedMotoServer
from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket
from pydantic import SecretStr

from blocks import ModelLimit, ModulateCredentials, OrgLimits, ParquetOutput, PlatformCredentials
from emulator import EmulatorConfig, run_in_thread

__all__ = ["LocalServices", "local_services", "save_blocks"]

# moto accepts any credentials; these only have to look like AWS ones.
AWS_KEY_ID = "testing"
AWS_SECRET = "testing"  # noqa: S105 - moto's conventional fake secret
REGION = "us-east-1"


@dataclass
class LocalServices:
    """Where the local S3 and the emulator listen."""

    s3_endpoint: str
    emulator: Any  # emulator.server.RunningEmulator

    @property
    def emulator_url(self) -> str:
        return str(self.emulator.url)

    def s3_client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=AWS_KEY_ID,
            aws_secret_access_key=AWS_SECRET,
            region_name=REGION,
        )

    def aws_credentials(self) -> AwsCredentials:
        return AwsCredentials(
            aws_access_key_id=AWS_KEY_ID,
            aws_secret_access_key=SecretStr(AWS_SECRET),
            region_name=REGION,
            aws_client_parameters=AwsClientParameters(endpoint_url=self.s3_endpoint),
        )

    def upload(self, bucket: str, files: Mapping[str, bytes]) -> None:
        """Create the bucket if needed and put every file."""
        client = self.s3_client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for key, data in files.items():
            client.put_object(Bucket=bucket, Key=key, Body=data)


@contextlib.contextmanager
def local_services(config: EmulatorConfig | None = None) -> Iterator[LocalServices]:
    """Start a moto S3 server and the emulator on free ports of 127.0.0.1; stop both after."""
    # moto's werkzeug logs every request at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        with run_in_thread(config or EmulatorConfig.default()) as emulator:
            yield LocalServices(s3_endpoint=f"http://{host}:{port}", emulator=emulator)
    finally:
        moto.stop()


async def save_blocks(
    services: LocalServices,
    *,
    name: str,
    bucket: str,
    output_root: str,
    organization: str,
    api_key: str,
    limits: Mapping[str, ModelLimit],
    platform_account: str | None = None,
    platform_key: str | None = None,
) -> None:
    """Save (or overwrite) every block a run needs, all under `name`."""
    aws = services.aws_credentials()
    await S3Bucket(bucket_name=bucket, credentials=aws).asave(name, overwrite=True)
    await ModulateCredentials(
        api_key=SecretStr(api_key), base_url=services.emulator_url
    ).asave(name, overwrite=True)
    await OrgLimits(organization=organization, models=dict(limits)).asave(name, overwrite=True)
    output_aws = aws if output_root.startswith("s3://") else None
    await ParquetOutput(root=output_root, aws_credentials=output_aws).asave(name, overwrite=True)
    if platform_account and platform_key:
        await PlatformCredentials(
            account_uuid=platform_account,
            api_key=SecretStr(platform_key),
            base_url=services.emulator_url,
        ).asave(name, overwrite=True)
