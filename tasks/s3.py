"""Find audio in S3 and move bytes in and out, without blocking the event loop.

Listing is lazy: one page of at most 1,000 keys is in memory at a time, so a prefix
of 100,000 objects streams through. boto3 is blocking, so every call runs in a thread.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AudioObject", "S3Input", "iter_audio", "read_object", "write_object"]

PAGE_SIZE = 1000


class S3Input(BaseModel):
    """Which audio objects a run takes from S3."""

    model_config = ConfigDict(frozen=True)

    bucket_block: str = Field(
        default="audio-inbox",
        description="Name of a prefect-aws S3 Bucket block (bucket and credentials).",
    )
    prefix: str = Field(default="", description="Only keys under this prefix, e.g. calls/2026/.")
    pattern: str = Field(
        default="*",
        description="Glob on the key's name after the prefix, e.g. *.wav or **/*.mp3.",
    )
    modified_since: datetime | None = Field(
        default=None, description="Only objects modified at or after this time."
    )
    max_files: int | None = Field(
        default=None, ge=1, description="Stop after this many matching objects."
    )

    @field_validator("modified_since")
    @classmethod
    def _utc_when_naive(cls, value: datetime | None) -> datetime | None:
        # S3 times are UTC-aware; a time typed into the UI form may not be.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


@dataclass(frozen=True)
class AudioObject:
    """One object version found in the bucket."""

    bucket: str
    key: str
    size: int
    etag: str
    last_modified: datetime

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @property
    def file_id(self) -> str:
        """Stable id of this object version: a changed object is a new file."""
        return hashlib.sha256(f"{self.uri}\n{self.etag}".encode()).hexdigest()[:16]

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def date(self) -> str:
        """The partition its rows land in: the day the object was last modified."""
        return self.last_modified.date().isoformat()


async def iter_audio(s3_client: Any, bucket: str, selection: S3Input) -> AsyncIterator[AudioObject]:
    """Yield the objects under the selection's prefix that match its pattern, page by page.

    Args:
        s3_client: A boto3 S3 client (endpoint override for moto or MinIO allowed).
        bucket: The bucket name.
        selection: Prefix, pattern, modified-since and max-files.
    """
    yielded = 0
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": selection.prefix, "MaxKeys": PAGE_SIZE}
    while True:
        page = await asyncio.to_thread(s3_client.list_objects_v2, **kwargs)
        for item in page.get("Contents", []):
            obj = AudioObject(
                bucket=bucket,
                key=item["Key"],
                size=item["Size"],
                etag=item["ETag"].strip('"'),
                last_modified=item["LastModified"],
            )
            if not _selected(obj, selection):
                continue
            yield obj
            yielded += 1
            if selection.max_files is not None and yielded >= selection.max_files:
                return
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _selected(obj: AudioObject, selection: S3Input) -> bool:
    if obj.key.endswith("/"):
        return False
    if selection.modified_since is not None and obj.last_modified < selection.modified_since:
        return False
    relative = obj.key[len(selection.prefix) :].lstrip("/")
    return fnmatch.fnmatchcase(relative, selection.pattern) or fnmatch.fnmatchcase(
        obj.filename, selection.pattern
    )


async def read_object(s3_client: Any, bucket: str, key: str) -> bytes:
    """The whole object's bytes (batch files are at most 100 MB)."""
    response = await asyncio.to_thread(s3_client.get_object, Bucket=bucket, Key=key)
    return await asyncio.to_thread(response["Body"].read)


async def write_object(
    s3_client: Any, bucket: str, key: str, data: bytes, content_type: str
) -> str:
    """Put bytes at bucket/key and return the object's s3:// URI."""
    await asyncio.to_thread(
        s3_client.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type
    )
    return f"s3://{bucket}/{key}"
