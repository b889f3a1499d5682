"""Find audio in S3 and move bytes in and out, without blocking the event loop.

Listing is lazy: a page of at most 1,000 keys is in memory, and the next one on its way
(the first page is 100 keys, for a quick start), so a prefix of 100,000 objects streams
through. Whole objects are read by `ObjectReader`, a presigned GET in the event loop;
large ones by ranges and written by multipart upload, so neither sits in memory whole.
boto3 is blocking, so every boto3 call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Self

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from store.tables import file_id_for

__all__ = [
    "AudioObject",
    "MultipartUpload",
    "ObjectReader",
    "S3Input",
    "S3Listing",
    "iter_object",
    "read_head",
    "read_object",
    "write_object",
]

PAGE_SIZE = 1000
# The first page is short: a run's first chunk, and with it its first call, waits for it.
# moto answered 1,000 keys in 0.6 s and 100 in 0.09 s on the bench host; the pages after it
# come one ahead of the consumer, so their size costs no wait.
FIRST_PAGE_SIZE = 100
RANGE_BYTES = 8 * 1024 * 1024  # one ranged GET; the next is fetched while this one is sent
FRAME_BYTES = 1024 * 1024  # one binary WebSocket frame
PART_BYTES = 8 * 1024 * 1024  # one multipart upload part of the redacted MP3
MIN_PART_BYTES = 5 * 1024 * 1024  # S3's minimum for every part but the last
READ_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10)  # a 100 MB file at 1/3 MB/s
# Reads boto3 served after the URL could not, before a run reads through boto3 only: a
# blip of S3 costs a strike, a URL the set-up can never serve (a custom CA bundle, a
# proxy in the botocore config, a bucket in another region) costs three.
FAST_PATH_STRIKES = 3

logger = logging.getLogger(__name__)


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
        default=None, ge=1,
        description="Process at most this many matching objects not yet completed.",
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
        return file_id_for(self.uri, self.etag)

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def date(self) -> str:
        """The partition its rows land in: the day the object was last modified."""
        return self.last_modified.date().isoformat()


class S3Listing:
    """The selected objects under a prefix, as an async iterator, one page fetched ahead.

    The next page's request goes out as soon as a page arrives, so a consumer slower than S3
    never waits for a page, and `ready()` tells one that can do without the next object
    (`tasks/ordering.py`) whether it would have to wait. At most two pages are in memory.

    Args:
        s3_client: A boto3 S3 client (endpoint override for moto or MinIO allowed).
        bucket: The bucket name.
        selection: Prefix, pattern, modified-since and max-files.
        skip: Objects to pass over (the ledger's finished ones) before `max_files` counts,
            so a rerun with max_files=100 takes the next 100, not the same finished ones.
    """

    def __init__(
        self,
        s3_client: Any,
        bucket: str,
        selection: S3Input,
        skip: Callable[[AudioObject], Awaitable[bool]] | None = None,
    ) -> None:
        self._s3_client = s3_client
        self._bucket = bucket
        self._selection = selection
        self._skip = skip
        self._page: asyncio.Future[dict[str, Any]] | None = None  # the request out
        self._in_hand = 0  # keys of the current page not yet looked at

    def prefetch(self) -> None:
        """Send the first page's request now (a run lists while it sets up the rest)."""
        if self._page is None:
            self._page = self._request({})

    def ready(self) -> bool:
        """Whether the next object (or the listing's end) comes without waiting for S3."""
        return self._in_hand > 0 or self._page is None or self._page.done()

    def __aiter__(self) -> AsyncIterator[AudioObject]:
        return self._objects()

    async def _objects(self) -> AsyncIterator[AudioObject]:
        self.prefetch()
        yielded = 0
        try:
            while self._page is not None:
                page = await self._page
                truncated = page.get("IsTruncated")
                token = {"ContinuationToken": page["NextContinuationToken"]} if truncated else {}
                self._page = self._request(token) if truncated else None
                contents = page.get("Contents", [])
                self._in_hand = len(contents)
                for item in contents:
                    self._in_hand -= 1
                    obj = AudioObject(
                        bucket=self._bucket,
                        key=item["Key"],
                        size=item["Size"],
                        etag=item["ETag"].strip('"'),
                        last_modified=item["LastModified"],
                    )
                    if not _selected(obj, self._selection) or (
                        self._skip is not None and await self._skip(obj)
                    ):
                        continue
                    yield obj
                    yielded += 1
                    if self._selection.max_files is not None and (
                        yielded >= self._selection.max_files
                    ):
                        return
        finally:
            self._in_hand = 0
            if self._page is not None:
                self._page.cancel()  # the thread's call ends on its own; its page is dropped
                self._page = None

    def _request(self, token: dict[str, str]) -> asyncio.Future[dict[str, Any]]:
        page = asyncio.ensure_future(asyncio.to_thread(
            self._s3_client.list_objects_v2,
            Bucket=self._bucket, Prefix=self._selection.prefix,
            MaxKeys=PAGE_SIZE if token else FIRST_PAGE_SIZE, **token,
        ))
        # Retrieved here too, so that a page nobody awaits (the run stopped before its
        # listing) does not log "exception was never retrieved"; the consumer still gets it.
        page.add_done_callback(lambda done: done.cancelled() or done.exception())
        return page


def _selected(obj: AudioObject, selection: S3Input) -> bool:
    if obj.key.endswith("/"):
        return False
    if selection.modified_since is not None and obj.last_modified < selection.modified_since:
        return False
    relative = obj.key[len(selection.prefix) :].lstrip("/")
    return fnmatch.fnmatchcase(relative, selection.pattern) or fnmatch.fnmatchcase(
        obj.filename, selection.pattern
    )


class ObjectReader:
    """Reads whole objects: a GET of a presigned URL in the event loop, else boto3's get_object.

    boto3's get_object costs 1.8-2.5 ms of CPU per small object on the bench host and a hop
    to the default executor, whose cpu + 4 threads also serve the writer and the claims;
    aiohttp's GET of a URL the same client signs costs about 1 ms in the loop, and ours
    fell from 7.3 to 5.6-6.7 ms of CPU per file (`python -m bench --files 1000 --only
    ours`, session 14). The URL carries the client's credentials, region and endpoint, so
    what a run may read does not change, and an answer the URL gets that is not the object
    is asked of boto3 again, with its own retries, redirects and errors: a missing object
    fails as it always did.

    A client with refreshable credentials (assume-role) refreshes them while signing, in
    the loop: once an hour, a stall of one STS round trip.

    Example:
        async with ObjectReader(s3_client) as reader:
            audio = await reader.read("audio-inbox", "calls/a.wav")
    """

    def __init__(self, s3_client: Any) -> None:
        self._s3_client = s3_client
        self._session: aiohttp.ClientSession | None = None
        self._strikes = 0

    @property
    def fast(self) -> bool:
        """Whether reads still try the presigned URL first."""
        return self._strikes < FAST_PATH_STRIKES

    async def __aenter__(self) -> Self:
        # trust_env: the proxy variables boto3 honours, this session honours too.
        self._session = aiohttp.ClientSession(timeout=READ_TIMEOUT, trust_env=True)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def read(self, bucket: str, key: str) -> bytes:
        """The whole object's bytes (batch files are at most 100 MB)."""
        if self._session is None or not self.fast:
            return await read_object(self._s3_client, bucket, key)
        url = self._s3_client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}
        )
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status == 200:
                    return await response.read()
                failed: str = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            failed = type(exc).__name__
        data = await read_object(self._s3_client, bucket, key)  # raises what boto3 raises
        self._strikes += 1
        if not self.fast:
            logger.warning(
                "%d presigned S3 reads failed that boto3 then made (the last: %s): reading "
                "through boto3 for the rest of the run, about 1 ms more CPU per file",
                FAST_PATH_STRIKES, failed,
            )
        return data


async def read_object(s3_client: Any, bucket: str, key: str) -> bytes:
    """The whole object's bytes (batch files are at most 100 MB)."""

    def get() -> bytes:
        body: bytes = s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    # One thread hop, not two: each hop is a wake-up of the event loop the calls share.
    return await asyncio.to_thread(get)


async def write_object(
    s3_client: Any, bucket: str, key: str, data: bytes, content_type: str
) -> str:
    """Put bytes at bucket/key and return the object's s3:// URI."""
    await asyncio.to_thread(
        s3_client.put_object, Bucket=bucket, Key=key, Body=data, ContentType=content_type
    )
    return f"s3://{bucket}/{key}"


async def iter_object(
    s3_client: Any,
    bucket: str,
    key: str,
    *,
    start: int,
    end: int,
    range_bytes: int = RANGE_BYTES,
    frame_bytes: int = FRAME_BYTES,
) -> AsyncIterator[bytes]:
    """Yield bytes [start, end) of an object as frames, one ranged GET ahead of the consumer.

    At most two ranges are in memory: the one being yielded and the one being fetched.
    """

    def fetch(pos: int) -> bytes:
        stop = min(pos + range_bytes, end) - 1
        response = s3_client.get_object(Bucket=bucket, Key=key, Range=f"bytes={pos}-{stop}")
        data: bytes = response["Body"].read()
        return data

    pos = start
    pending = asyncio.ensure_future(asyncio.to_thread(fetch, pos)) if pos < end else None
    try:
        while pending is not None:
            data = await pending
            pos += len(data)
            pending = None
            if data and pos < end:
                pending = asyncio.ensure_future(asyncio.to_thread(fetch, pos))
            view = memoryview(data)
            for offset in range(0, len(view), frame_bytes):
                yield bytes(view[offset : offset + frame_bytes])
            del view, data
    finally:
        if pending is not None:
            pending.cancel()


def read_head(s3_client: Any, obj: AudioObject, size: int) -> bytes:
    """The first `size` bytes of an object (blocking: call it in a thread)."""
    stop = min(size, obj.size) - 1
    response = s3_client.get_object(Bucket=obj.bucket, Key=obj.key, Range=f"bytes=0-{stop}")
    data: bytes = response["Body"].read()
    return data


class MultipartUpload:
    """Bytes to one S3 object as they come: parts of `part_bytes`, one part in memory.

    Output that never fills a part is written with one PUT instead.
    """

    def __init__(self, s3_client: Any, bucket: str, key: str, part_bytes: int) -> None:
        self.s3, self.bucket, self.key, self.part_bytes = s3_client, bucket, key, part_bytes
        self.buffer = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.buffer += data
        self.size += len(data)
        while len(self.buffer) >= self.part_bytes:
            part = bytes(self.buffer[: self.part_bytes])
            del self.buffer[: self.part_bytes]
            await self._upload(part)

    async def finish(self) -> str:
        if self.upload_id is None:
            await asyncio.to_thread(
                self.s3.put_object, Bucket=self.bucket, Key=self.key, Body=bytes(self.buffer),
                ContentType="audio/mpeg",
            )
        else:
            if self.buffer:
                await self._upload(bytes(self.buffer))
            await asyncio.to_thread(
                self.s3.complete_multipart_upload, Bucket=self.bucket, Key=self.key,
                UploadId=self.upload_id, MultipartUpload={"Parts": self.parts},
            )
        self.buffer.clear()
        return f"s3://{self.bucket}/{self.key}"

    async def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(BotoCoreError, ClientError):
                await asyncio.to_thread(
                    self.s3.abort_multipart_upload, Bucket=self.bucket, Key=self.key,
                    UploadId=self.upload_id,
                )
            self.upload_id = None

    async def _upload(self, part: bytes) -> None:
        if self.upload_id is None:
            created = await asyncio.to_thread(
                self.s3.create_multipart_upload, Bucket=self.bucket, Key=self.key,
                ContentType="audio/mpeg",
            )
            self.upload_id = created["UploadId"]
        number = len(self.parts) + 1
        response = await asyncio.to_thread(
            self.s3.upload_part, Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
            PartNumber=number, Body=part,
        )
        self.parts.append({"PartNumber": number, "ETag": response["ETag"]})
