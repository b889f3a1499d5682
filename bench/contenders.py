"""The contenders, each run on the same S3 files against its own emulator org.

* ours: `flows.transcribe` with the org's limits synced into Prefect (OrgLimits.sync());
* plain: the script the vendor docs suggest (asyncio semaphore, httpx, retry on 429 after
  `2**attempt + random.uniform(0, 1)` seconds, boto3 reads in threads);
* floor: the least any client of our libraries does per file, for the CPU figure: one
  aiohttp GET of a URL boto3 presigns and one httpx POST over aiohttp whose body is built
  once, C at once, nothing else (no retries, no ledger, no Prefect);
* naive: a Prefect flow with one task per file under a tag concurrency limit.

Each returns how many files completed; `measure()` wraps a run with wall time, this
process's CPU time and its peak RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import HttpxAiohttpClient
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from bench.services import BenchServices, busy_share, host_cpu_ticks
from blocks import ModelLimit, OrgLimits
from flows import transcribe
from modulate_flows.local import save_blocks
from tasks.runner import RunSettings, RunSummary
from tasks.s3 import S3Input

__all__ = [
    "Measured", "measure", "prepare_ours", "run_floor", "run_naive", "run_ours", "run_plain",
]

STT_PATH = "/api/velma-2-stt-batch"
# The baselines send the options our flow sends by default (STTOptions()), so the service
# does the same work for every contender.
STT_FORM = {
    "speaker_diarization": "true",
    "emotion_signal": "false",
    "accent_signal": "false",
    "deepfake_signal": "false",
    "pii_phi_tagging": "false",
}
PLAIN_MAX_ATTEMPTS = 8
NAIVE_TAG = "bench-naive-stt"
RSS_SAMPLE_S = 0.02
HTTP_TIMEOUT_S = 120.0


@dataclass
class Measured:
    """Wall seconds, CPU seconds of this process, and the peak RSS sampled during a run."""

    seconds: float = 0.0
    cpu_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    host_busy: float = 0.0  # the share of the machine's CPU time busy meanwhile
    services_cpu_seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def measure(services: BenchServices) -> Iterator[Measured]:
    """Time the block; sample this process's resident memory every 20 ms meanwhile.

    ru_maxrss is the peak over the process's life, so it cannot tell two runs apart;
    /proc/self/statm read in a thread gives each run's own peak.
    """
    # What came before (the bench's upload of N files, the previous contender) is collected
    # before the clock starts: without this the first run after the upload paid for a full
    # collector pass over the upload's objects in its set-up, which started its first chunk
    # 0.26 s later (session 17's timeline of ours-small on a fresh 5,000-object bucket).
    # No user's flow starts that way.
    gc.collect()
    result = Measured()
    stop = threading.Event()
    page_mb = resource.getpagesize() / 2**20

    def sample() -> None:
        while True:
            with open("/proc/self/statm", encoding="ascii") as statm:
                result.peak_rss_mb = max(result.peak_rss_mb, int(statm.read().split()[1]) * page_mb)
            if stop.wait(RSS_SAMPLE_S):
                return

    sampler = threading.Thread(target=sample, name="bench-rss", daemon=True)
    started, cpu, services_cpu = time.perf_counter(), _cpu_seconds(), services.cpu_seconds()
    host = host_cpu_ticks()
    sampler.start()
    try:
        yield result
    finally:
        result.seconds = time.perf_counter() - started
        result.host_busy = busy_share(host, host_cpu_ticks())
        stop.set()
        sampler.join()
        # The sampler's own reads cost CPU too; they are a rounding error (50 reads/s).
        result.cpu_seconds = _cpu_seconds() - cpu
        result.services_cpu_seconds = {
            name: round(used - services_cpu[name], 2)
            for name, used in services.cpu_seconds().items()
        }


async def prepare_ours(
    services: BenchServices, *, org: str, bucket: str, output_root: str, concurrent: int
) -> None:
    """Save the org's blocks and sync its limits into Prefect (set-up, not measured)."""
    await save_blocks(
        services.local,
        name=org,
        bucket=bucket,
        output_root=output_root,
        organization=org,
        api_key=f"key-{org}",
        limits={"stt": ModelLimit(concurrent=concurrent)},
    )
    await (await OrgLimits.aload(org)).sync()


async def run_ours(
    *, org: str, prefix: str, files: int, chunk_size: int | None = None
) -> RunSummary:
    """Run the transcription flow with the blocks `prepare_ours` saved under `org`."""
    extra = {"chunk_size": chunk_size} if chunk_size else {}
    state = await transcribe(
        source=S3Input(bucket_block=org, prefix=prefix, max_files=files),
        settings=RunSettings(
            credentials_block=org, limits_block=org, output_block=org, **extra
        ),
        return_state=True,
    )
    summary: RunSummary = await state.result()  # type: ignore[misc]
    return summary


async def run_plain(
    services: BenchServices, *, org: str, bucket: str, keys: list[str], concurrent: int
) -> int:
    """The vendor-docs script: every file at once behind a semaphore of `concurrent`."""
    s3 = services.local.s3_client()
    url = services.emulator_url + STT_PATH
    semaphore = asyncio.Semaphore(concurrent)

    async def one(client: httpx.AsyncClient, key: str) -> bool:
        audio = await asyncio.to_thread(_read, s3, bucket, key)
        async with semaphore:
            return await _post_retrying_429(client, url, f"key-{org}", key, audio)

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        done = await asyncio.gather(*(one(client, key) for key in keys))
    return sum(done)


async def run_floor(
    services: BenchServices, *, org: str, bucket: str, keys: list[str], concurrent: int
) -> int:
    """One GET and one POST per file and nothing more: the CPU floor of our libraries.

    The read is an aiohttp GET of a URL boto3 presigns, as tasks/s3.py's ObjectReader
    reads; the POST is httpx's over aiohttp, as modulate/_http.py sends, with the body
    joined before the send (one socket write, as modulate/batch.py does), and the pool
    keeps a connection per call in flight, so no library does more than it must; the reads
    go ahead of the calls by at most `concurrent`.
    """
    s3 = services.local.s3_client()
    url = services.emulator_url + STT_PATH
    calls, reads = asyncio.Semaphore(concurrent), asyncio.Semaphore(2 * concurrent)
    limits = httpx.Limits(max_keepalive_connections=2 * concurrent)

    async def one(client: httpx.AsyncClient, session: aiohttp.ClientSession, key: str) -> bool:
        async with reads:
            presigned = s3.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": key}
            )
            async with session.get(presigned) as got:
                audio = await got.read()
            request = client.build_request(
                "POST", url, headers={"X-API-Key": f"key-{org}"}, data=STT_FORM,
                files={"upload_file": (key.rsplit("/", 1)[-1], audio, "audio/wav")},
            )
            request.read()
            async with calls:
                response = await client.send(request)
        response.json()
        return response.status_code == 200

    async with (
        HttpxAiohttpClient(timeout=HTTP_TIMEOUT_S, limits=limits) as client,
        aiohttp.ClientSession() as session,
    ):
        done = await asyncio.gather(*(one(client, session, key) for key in keys))
    return sum(done)


# The naive flow's task reads these instead of taking them as parameters: a key passed
# as a task parameter would be stored with every task run.
_naive: dict[str, Any] = {}


@task(tags=[NAIVE_TAG], cache_policy=NO_CACHE)
async def _naive_file(key: str) -> bool:
    """One file: read it from S3, post it, retry on 429 like the plain script."""
    bucket, s3, url, api_key = _naive["bucket"], _naive["s3"], _naive["url"], _naive["api_key"]
    audio = await asyncio.to_thread(_read, s3, bucket, key)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        return await _post_retrying_429(client, url, api_key, key, audio)


async def _post_retrying_429(
    client: httpx.AsyncClient, url: str, api_key: str, key: str, audio: bytes
) -> bool:
    """The vendor docs' retry helper: back off `2**attempt + U(0, 1)` s on 429, else done."""
    for attempt in range(PLAIN_MAX_ATTEMPTS):
        response = await client.post(
            url,
            headers={"X-API-Key": api_key},
            files={"upload_file": (key.rsplit("/", 1)[-1], audio, "audio/wav")},
            data=STT_FORM,
        )
        if response.status_code == 429:
            await asyncio.sleep(2**attempt + random.uniform(0, 1))
            continue
        response.raise_for_status()
        response.json()
        return True
    return False


@flow(name="bench-naive-one-task-per-file")
def _naive_flow(keys: list[str]) -> int:
    """One mapped task per file, held to the org's limit by a tag concurrency limit."""
    return sum(future.result() for future in _naive_file.map(keys))


async def run_naive(
    services: BenchServices, *, org: str, bucket: str, keys: list[str], concurrent: int
) -> int:
    """Create the tag limit and run the naive flow (in a worker thread: it is a sync flow)."""
    async with get_client() as client:
        with contextlib.suppress(Exception):
            await client.delete_concurrency_limit_by_tag(NAIVE_TAG)
        await client.create_concurrency_limit(tag=NAIVE_TAG, concurrency_limit=concurrent)
    _naive.update(
        bucket=bucket,
        s3=services.local.s3_client(),
        url=services.emulator_url + STT_PATH,
        api_key=f"key-{org}",
    )
    return await asyncio.to_thread(_naive_flow, keys)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _read(s3: Any, bucket: str, key: str) -> bytes:
    data: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    return data
