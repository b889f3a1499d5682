"""S3 listing: pages through a prefix lazily and applies the pattern, date and count filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modulate_flows.local import LocalServices
from tasks.s3 import S3Input, S3Listing


async def _keys(services: LocalServices, bucket: str, selection: S3Input) -> list[str]:
    client = services.s3_client()
    return [obj.key async for obj in S3Listing(client, bucket, selection)]


async def test_listing_pages_and_filters(services: LocalServices) -> None:
    bucket = "listing"
    files = {f"many/{i:05d}.wav": b"x" for i in range(1050)}  # two pages of 1,000
    files.update({"many/notes.txt": b"x", "many/sub/deep.mp3": b"x", "other/a.wav": b"x"})
    services.upload(bucket, files)

    every_wav = await _keys(services, bucket, S3Input(prefix="many/", pattern="*.wav"))
    assert len(every_wav) == 1050 and len(set(every_wav)) == 1050
    assert await _keys(services, bucket, S3Input(prefix="many/", pattern="*.mp3")) == [
        "many/sub/deep.mp3"
    ]
    first = await _keys(services, bucket, S3Input(prefix="many/", max_files=5))
    assert first == [f"many/{i:05d}.wav" for i in range(5)]

    naive_future = datetime.now(UTC).replace(tzinfo=None) + timedelta(days=1)
    assert await _keys(services, bucket, S3Input(prefix="many/", modified_since=naive_future)) == []
