"""Whole-object reads: a presigned GET in the event loop, boto3's get_object where it cannot.

The S3 endpoint is a fault proxy in front of moto, so a read the URL cannot serve is an
answer on a real socket; botocore's own event counts the get_object calls boto3 makes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from botocore.exceptions import ClientError

from modulate_flows.local import LocalServices
from tasks.s3 import FAST_PATH_STRIKES, ObjectReader
from tests.fault_proxy import FaultProxy

BUCKET = "reads"
FILES = {f"calls/{i}.wav": bytes([i]) * (1000 + i) for i in range(4)}


@pytest.fixture
def proxied(services: LocalServices) -> Iterator[tuple[FaultProxy, list[str], object]]:
    """A fault proxy in front of moto, an S3 client of it, and the client's get_object calls."""
    services.upload(BUCKET, FILES)
    proxy = FaultProxy(services.s3_endpoint).start()
    client = LocalServices(
        s3_endpoint=proxy.url, emulator=services.emulator
    ).s3_client()
    boto3_gets: list[str] = []
    client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: boto3_gets.append(params["url_path"])
    )
    try:
        yield proxy, boto3_gets, client
    finally:
        proxy.stop()


async def test_reads_take_the_url_and_never_boto3(proxied) -> None:
    proxy, boto3_gets, client = proxied
    async with ObjectReader(client) as reader:
        read = {key: await reader.read(BUCKET, key) for key in FILES}
    assert read == FILES
    assert boto3_gets == []  # every read was the presigned GET
    assert sum(method == "GET" for method, _, _ in proxy.forwarded) == len(FILES)


async def test_a_read_the_url_cannot_serve_is_boto3s_and_strikes_turn_the_url_off(
    proxied,
) -> None:
    """A 503 of the URL is served by boto3 (which retries it itself); after
    FAST_PATH_STRIKES of those the run reads through boto3 only."""
    proxy, boto3_gets, client = proxied
    key = "calls/0.wav"
    async with ObjectReader(client) as reader:
        for strike in range(1, FAST_PATH_STRIKES + 1):
            proxy.fail("GET", "/reads/calls/0.wav", 503, times=1)
            assert await reader.read(BUCKET, key) == FILES[key]
            assert len(boto3_gets) == strike
        assert not reader.fast
        assert await reader.read(BUCKET, "calls/1.wav") == FILES["calls/1.wav"]
    assert len(boto3_gets) == FAST_PATH_STRIKES + 1  # the URL is no longer tried


async def test_a_missing_object_fails_as_boto3_fails_and_costs_no_strike(proxied) -> None:
    _, boto3_gets, client = proxied
    async with ObjectReader(client) as reader:
        for _ in range(FAST_PATH_STRIKES + 1):
            with pytest.raises(ClientError) as raised:
                await reader.read(BUCKET, "calls/gone.wav")
            assert raised.value.response["Error"]["Code"] in ("NoSuchKey", "404")
        assert reader.fast  # boto3 could not read it either: the URL was not at fault
        assert await reader.read(BUCKET, "calls/2.wav") == FILES["calls/2.wav"]
    assert len(boto3_gets) == FAST_PATH_STRIKES + 1
