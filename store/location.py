"""Where the Parquet goes: a local directory or ``s3://bucket/prefix``, and how to reach it.

Also the layout under the root every other module of ``store`` shares: one Hive directory
``<table>/model=<m>/date=<d>/`` per partition, and which names in it are data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from pydantic import SecretStr

from store.tables import PARTITION_COLUMNS, check_partition

__all__ = [
    "PARTITIONING",
    "OutputLocation",
    "data_files",
    "partition_dir",
    "read_data_files",
    "table_dir",
]

DEFAULT_REGION = "us-east-1"
_LISTINGS = 5  # of directories that another run keeps compacting, before a read gives up

_T = TypeVar("_T")

# Partition columns are kept out of the files (they live in the path) because pandas refuses
# a dataset that has them in both. What each reader makes of them, checked in
# tests/test_output.py (keep in sync with the README's data schema section):
#   pyarrow.dataset(partitioning="hive"), read_table(): model string, date string
#   pandas.read_parquet(dir):                           model category, date category
#   DuckDB read_parquet(..., hive_partitioning=true):   model VARCHAR, date DATE
#   polars.read_parquet(..., hive_partitioning=True):   model String, date Date
PARTITIONING = ds.partitioning(
    pa.schema([(name, pa.string()) for name in PARTITION_COLUMNS]), flavor="hive"
)


@dataclass(frozen=True)
class OutputLocation:
    """The dataset root, a local directory or ``s3://bucket/prefix``, and how to reach it.

    Keys are SecretStr (a plain str is wrapped), so repr and logs never show them.
    """

    root: str
    s3_endpoint_url: str | None = None
    aws_access_key_id: SecretStr | str | None = None
    aws_secret_access_key: SecretStr | str | None = None
    aws_session_token: SecretStr | str | None = None  # STS and SSO credentials carry one
    region: str | None = None

    def __post_init__(self) -> None:
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, SecretStr(value))

    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        """Return the filesystem and the root path on it (``bucket/prefix`` for S3).

        A local root is made absolute and created.
        """
        if not self.is_s3:
            path = os.path.abspath(self.root)
            os.makedirs(path, exist_ok=True)
            return pafs.LocalFileSystem(), path
        kwargs: dict[str, Any] = {"region": self.region or DEFAULT_REGION}
        if self.s3_endpoint_url:
            endpoint = urlparse(self.s3_endpoint_url)
            kwargs["endpoint_override"] = endpoint.netloc or endpoint.path
            kwargs["scheme"] = endpoint.scheme or "https"
        access_key, secret_key = self.aws_access_key_id, self.aws_secret_access_key
        if access_key and secret_key:
            kwargs["access_key"] = _reveal(access_key)
            kwargs["secret_key"] = _reveal(secret_key)
            if self.aws_session_token:
                kwargs["session_token"] = _reveal(self.aws_session_token)
        return pafs.S3FileSystem(**kwargs), self._bucket_path()

    def s3_client(self) -> Any:
        """A boto3 client for what pyarrow's filesystem cannot do (conditional writes)."""
        import boto3  # only S3 roots need it

        access_key, secret_key = self.aws_access_key_id, self.aws_secret_access_key
        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.region or DEFAULT_REGION,
            aws_access_key_id=_reveal(access_key) if access_key else None,
            aws_secret_access_key=_reveal(secret_key) if secret_key else None,
            aws_session_token=_reveal(self.aws_session_token) if self.aws_session_token else None,
        )

    def uri(self, table: str) -> str:
        """Return where ``table`` lives, for display (no credentials)."""
        root = self.root.rstrip("/") if self.is_s3 else os.path.abspath(self.root)
        return f"{root}/{table}"

    def _bucket_path(self) -> str:
        base = self.root.removeprefix("s3://").strip("/")
        if not base:
            raise ValueError("an s3:// root needs a bucket")
        return base


def table_dir(base: str, table_name: str) -> str:
    """The directory of a table under the root path ``base``."""
    return f"{base}/{table_name}"


def partition_dir(base: str, table_name: str, model: str, date: str) -> str:
    """The directory of one ``model=<m>/date=<d>`` partition; raises for unsafe values."""
    check_partition(model, date)
    return f"{table_dir(base, table_name)}/model={model}/date={date}"


def data_files(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """The Parquet files readers see in a directory: ``_`` and ``.`` names are work in progress."""
    selector = pafs.FileSelector(directory, allow_not_found=True)
    for listing in range(1, _LISTINGS + 1):
        try:
            found = fs.get_file_info(selector)
            break
        except FileNotFoundError:
            # pyarrow raised "Cannot list directory" (errno 2) for a partition that existed
            # while another process's compaction deleted fragments in it (CI, session 8).
            if listing == _LISTINGS:
                raise
    return [
        info
        for info in found
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith(("_", "."))
    ]


def read_data_files(
    fs: pafs.FileSystem, directories: Sequence[str], read: Callable[[list[str]], _T]
) -> _T:
    """``read(paths)`` of the data files of ``directories``, listing them again when another
    run's compaction deleted files this read had listed.

    A compaction writes the segment holding the rows before it deletes their fragments, so
    a fresh listing sees every row. Any other I/O error is raised.
    """
    for _ in range(_LISTINGS - 1):
        paths = _data_paths(fs, directories)
        try:
            return read(paths)
        except OSError:
            if set(paths) <= set(_data_paths(fs, directories)):
                raise
    return read(_data_paths(fs, directories))


def _data_paths(fs: pafs.FileSystem, directories: Sequence[str]) -> list[str]:
    return [info.path for directory in directories for info in data_files(fs, directory)]


def _reveal(secret: SecretStr | str) -> str:
    return secret.get_secret_value() if isinstance(secret, SecretStr) else secret
