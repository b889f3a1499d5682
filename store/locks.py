"""One compactor per partition at a time, across processes and machines.

Locally, an ``flock`` on ``<partition>/_compaction.lock``: the kernel releases it when the
holder dies, so a crash never leaves it held. On S3, an object created with
``If-None-Match: *`` (a conditional PUT: exactly one of two creators succeeds) holding its
expiry; a holder that died is overtaken once that passes. Readers skip ``_`` names.

The lock is what keeps two compactions from writing overlapping outputs (duplicates until
the next compaction); it is not what keeps rows safe: a compactor only ever deletes the
inputs whose surviving rows it has already written (store/compaction.py).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
from botocore.exceptions import ClientError

from store.location import OutputLocation

__all__ = ["LOCK_NAME", "LOCK_TTL_SECONDS", "partition_lock"]

LOCK_NAME = "_compaction.lock"
# An S3 lock outlives its holder by this much: longer than a compaction of the largest
# partition takes (bench/state.py: seconds for 2M rows), short enough to recover the same day.
LOCK_TTL_SECONDS = 1800.0
POLL_SECONDS = 0.05
_TAKEN = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


@contextlib.contextmanager
def partition_lock(
    location: OutputLocation, fs: pafs.FileSystem, directory: str, *, wait_seconds: float
) -> Iterator[bool]:
    """Hold the compaction lock of ``directory``; yields False if it stayed taken too long."""
    if isinstance(fs, pafs.LocalFileSystem):
        with _local_lock(fs, directory, wait_seconds) as held:
            yield held
    else:
        with _s3_lock(location, directory, wait_seconds) as held:
            yield held


@contextlib.contextmanager
def _local_lock(fs: pafs.FileSystem, directory: str, wait_seconds: float) -> Iterator[bool]:
    import fcntl  # POSIX only, like the local roots it guards
    import os

    fs.create_dir(directory, recursive=True)
    fd = os.open(f"{directory}/{LOCK_NAME}", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(POLL_SECONDS)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _s3_lock(location: OutputLocation, directory: str, wait_seconds: float) -> Iterator[bool]:
    client = location.s3_client()
    bucket, prefix = directory.split("/", 1)
    key = f"{prefix}/{LOCK_NAME}"
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_seconds
    while not _s3_try_create(client, bucket, key, token):
        _s3_break_if_expired(client, bucket, key)
        if time.monotonic() >= deadline:
            yield False
            return
        time.sleep(POLL_SECONDS)
    try:
        yield True
    finally:
        holder = _s3_holder(client, bucket, key)
        if holder is not None and holder.get("token") == token:
            client.delete_object(Bucket=bucket, Key=key)


def _s3_try_create(client: Any, bucket: str, key: str, token: str) -> bool:
    body = json.dumps({"token": token, "expires": time.time() + LOCK_TTL_SECONDS}).encode()
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _TAKEN:
            return False
        raise
    return True


def _s3_holder(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return {"expires": 0.0}  # unreadable: treat as expired


def _s3_break_if_expired(client: Any, bucket: str, key: str) -> None:
    holder = _s3_holder(client, bucket, key)
    if holder is not None and float(holder.get("expires", 0.0)) < time.time():
        client.delete_object(Bucket=bucket, Key=key)
