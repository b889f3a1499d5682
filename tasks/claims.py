"""Claims on files, so two runs over the same objects at once send each file once between them.

Before a chunk calls anything, its run claims the chunk's files (one thread hop per chunk):
one object per file, `_state/claims/<model>/<config_hash>/<file_id>.json` under the output
root, created exclusively (locally `O_CREAT | O_EXCL`, on S3 a PUT with `If-None-Match: *`).
A claim names its run. A run is live while its heartbeat `_state/runs/<run_id>.json` was
renewed less than `lease_s` ago; a thread of its own renews it every `lease_s / 3`, so a run
killed with SIGKILL lets go of all its claims one lease later, with no per-file renewal.

What a claimant finds (`Claims.acquire`):
- nothing: the claim is its own; it calls.
- a claim marked done (the holder wrote the file's rows while another run was live, then
  marked it): it records nothing.
- a claim of a live run: the file is held; the caller asks again later (tasks/batch.py waits,
  within a bound, and leaves the file to its holder past it).
- a claim of a dead run: taken over through a second exclusive object keyed by the dead run
  (`<file_id>.<dead_run>.takeover`), so of two runs taking over at once one wins.

A file's claim is removed once its rows are written, unless another run is live (then it is
marked done), and a run that ends with no other run live removes the claims of its model and
config that are left, done or dead. Clocks of the machines sharing an output must agree
within a small part of the lease.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlparse

import boto3
from botocore.exceptions import ClientError

from store.location import DEFAULT_REGION, OutputLocation

__all__ = ["DEFAULT_LEASE_S", "Acquired", "Claims"]

logger = logging.getLogger(__name__)

DEFAULT_LEASE_S = 30.0
CLAIMS_DIR = "_state/claims"
RUNS_DIR = "_state/runs"
# S3 answers a lost conditional PUT with 412, or 409 when another PUT of the key is under way.
_S3_LOST = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_DELETE_BATCH = 1000  # keys in one S3 DeleteObjects request, at most


@dataclass
class Acquired:
    """The outcome of one `acquire`: file ids now ours, held by a live run, or done elsewhere."""

    mine: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)


class Claims:
    """One run's claims on files of one model and config; `async with` it for its heartbeat.

    `acquire` and `mark_done` block (file or S3 I/O): call them in a thread.

    Args:
        location: The output root the claims live under.
        model: The ledger's model partition.
        config_hash: The job config.
        run_id: This run (the flow run id).
        lease_s: A run silent this long is dead and its claims are free.
    """

    def __init__(
        self,
        location: OutputLocation,
        model: str,
        config_hash: str,
        run_id: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.store = _store_for(location)
        self.run_id = run_id
        self.lease_s = lease_s
        self.directory = f"{CLAIMS_DIR}/{model}/{config_hash}"
        self._heartbeat = f"{RUNS_DIR}/{run_id}.json"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live: dict[str, bool] = {}  # run id -> live, for one acquire

    async def __aenter__(self) -> Claims:
        await asyncio.to_thread(self._beat)
        # A thread, not a task: a busy event loop must not make a live run look dead.
        self._thread = threading.Thread(target=self._renew, name="claims-heartbeat", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.lease_s)
        try:
            self.store.delete(self._heartbeat)
            if not self._others_live():
                self._sweep()
        except (OSError, ClientError) as error:  # a leftover claim only expires later
            logger.warning("could not tidy the claims under %s: %s", self.directory, error)

    def acquire(self, file_ids: Iterable[str]) -> Acquired:
        """Claim each file; see the module docstring for what each outcome means."""
        result = Acquired()
        self._live = {self.run_id: True}
        for file_id in file_ids:
            path = self._claim_path(file_id)
            if self.store.create(path, self._body(done=False)):
                result.mine.append(file_id)
                continue
            found = self.store.read(path)
            if found is None:  # released between our create and our read: try once more
                if self.store.create(path, self._body(done=False)):
                    result.mine.append(file_id)
                else:
                    result.held.append(file_id)
                continue
            holder = found.get("run_id", "")
            if found.get("done"):
                result.done.append(file_id)
            elif holder == self.run_id:
                result.mine.append(file_id)  # our own, from a wait that took it over
            elif self._is_live(holder):
                result.held.append(file_id)
            elif self.store.create(f"{self.directory}/{file_id}.{holder}.takeover", b"{}"):
                self.store.write(path, self._body(done=False))
                result.mine.append(file_id)
                logger.info("took over file %s from run %s, silent for a lease", file_id, holder)
            else:
                result.held.append(file_id)  # another run took it over first
        return result

    def mark_done(self, file_ids: Iterable[str]) -> None:
        """The files' rows are written: no later claimant may send them again.

        While another run is live, its ledger read may predate the rows: each claim is marked
        done. With none, the claims are removed: a run that starts later writes its heartbeat
        before it reads the ledger (tasks/runner.py), so it finds the rows there. Removed as
        the run goes, they no longer wait for the sweep at its end (an unlink takes ~0.17 ms
        on the bench host's disk: 0.85 s for 5,000 claims), and a removal costs less than
        half of a rewrite.
        """
        paths = [self._claim_path(file_id) for file_id in file_ids]
        if not self._others_live():
            self.store.delete_many(paths)
            return
        body = self._body(done=True)
        for path in paths:
            self.store.write(path, body)

    def _claim_path(self, file_id: str) -> str:
        return f"{self.directory}/{file_id}.json"

    def _body(self, *, done: bool) -> bytes:
        return json.dumps({"run_id": self.run_id, "done": done, "at": time.time()}).encode()

    def _is_live(self, run_id: str) -> bool:
        if run_id not in self._live:
            beat = self.store.read(f"{RUNS_DIR}/{run_id}.json")
            self._live[run_id] = beat is not None and _fresh(beat)
        return self._live[run_id]

    def _beat(self) -> None:
        beat = {"run_id": self.run_id, "renewed_at": time.time(), "lease_s": self.lease_s}
        self.store.write(self._heartbeat, json.dumps(beat).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self._beat()
            except (OSError, ClientError) as error:
                # Retried at the next beat; past a lease, other runs may take our files.
                logger.warning("could not renew the heartbeat of run %s: %s", self.run_id, error)

    def _others_live(self) -> bool:
        for name in self.store.list(RUNS_DIR):
            beat = self.store.read(f"{RUNS_DIR}/{name}")
            if beat is not None and beat.get("run_id") != self.run_id and _fresh(beat):
                return True
        return False

    def _sweep(self) -> None:
        """No other run is live: every claim here is done or dead; remove them."""
        names = self.store.list(self.directory)
        self.store.delete_many([f"{self.directory}/{name}" for name in names])


def _fresh(beat: dict[str, Any]) -> bool:
    return float(beat.get("renewed_at", 0)) + float(beat.get("lease_s", 0)) > time.time()


class _Store(Protocol):
    def create(self, path: str, body: bytes) -> bool: ...
    def read(self, path: str) -> dict[str, Any] | None: ...
    def write(self, path: str, body: bytes) -> None: ...
    def delete(self, path: str) -> None: ...
    def delete_many(self, paths: list[str]) -> None: ...
    def list(self, directory: str) -> list[str]: ...


def _store_for(location: OutputLocation) -> _Store:
    if location.is_s3:
        return _S3Store(location)
    return _LocalStore(os.path.abspath(location.root))


class _LocalStore:
    """Paths under a local root; a write is a rename, so a reader never sees half of one."""

    def __init__(self, root: str) -> None:
        self.root = root

    def create(self, path: str, body: bytes) -> bool:
        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        try:
            # Written whole in one call: a reader may see it empty for an instant (read() says
            # None, and acquire tries the create again, which fails).
            descriptor = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(body)
        return True

    def read(self, path: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.root, path), "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            return None
        return _parse(data)

    def write(self, path: str, body: bytes) -> None:
        full = os.path.join(self.root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        temp = f"{full}.{uuid.uuid4().hex}.tmp"
        with open(temp, "wb") as handle:
            handle.write(body)
        os.replace(temp, full)

    def delete(self, path: str) -> None:
        try:
            os.remove(os.path.join(self.root, path))
        except FileNotFoundError:
            pass

    def delete_many(self, paths: list[str]) -> None:
        for path in paths:
            self.delete(path)

    def list(self, directory: str) -> list[str]:
        try:
            names = os.listdir(os.path.join(self.root, directory))
        except FileNotFoundError:
            return []
        return sorted(name for name in names if not name.endswith(".tmp"))


class _S3Store:
    """Keys under `s3://bucket/prefix`; every PUT is atomic, the first one conditional."""

    def __init__(self, location: OutputLocation) -> None:
        base = location.root.removeprefix("s3://").strip("/")
        self.bucket, _, prefix = base.partition("/")
        self.prefix = f"{prefix}/" if prefix else ""
        keys: dict[str, Any] = {}
        if location.aws_access_key_id and location.aws_secret_access_key:
            keys = {
                "aws_access_key_id": _reveal(location.aws_access_key_id),
                "aws_secret_access_key": _reveal(location.aws_secret_access_key),
            }
        endpoint = location.s3_endpoint_url
        self.client = boto3.client(
            "s3", endpoint_url=endpoint if endpoint and urlparse(endpoint).scheme else None,
            region_name=location.region or DEFAULT_REGION, **keys,
        )

    def create(self, path: str, body: bytes) -> bool:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self.prefix + path, Body=body, IfNoneMatch="*"
            )
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _S3_LOST:
                return False
            raise
        return True

    def read(self, path: str) -> dict[str, Any] | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + path)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return _parse(response["Body"].read())

    def write(self, path: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + path, Body=body)

    def delete(self, path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + path)

    def delete_many(self, paths: list[str]) -> None:
        # One request per 1,000 keys (S3's most), not per key: a run of 10,000 files ended
        # with 10,000 DELETEs.
        for at in range(0, len(paths), _DELETE_BATCH):
            keys = [{"Key": self.prefix + path} for path in paths[at : at + _DELETE_BATCH]]
            response = self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True}
            )
            if errors := response.get("Errors"):
                code = errors[0].get("Code", "")
                raise OSError(f"S3 kept {len(errors)} of {len(keys)} claims ({code})")

    def list(self, directory: str) -> list[str]:
        start = f"{self.prefix}{directory}/"
        names: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=start
        ):
            names += [item["Key"][len(start):] for item in page.get("Contents", [])]
        return sorted(name for name in names if "/" not in name)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None  # being written (local create): treated as absent, acquire retries once
    return value if isinstance(value, dict) else None


def _reveal(secret: Any) -> str:
    return secret.get_secret_value() if hasattr(secret, "get_secret_value") else str(secret)
