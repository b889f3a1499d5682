"""Peak memory of streaming a 150 MiB WAV, against the same process before the stream.

`uv run python -m bench.stream_memory` starts the emulator and moto in processes of their own
(bench/services.py) and a Prefect test server, uploads the input by multipart, warms up on a
small file, then runs each measured flow over the large one while a thread samples this
process's RSS. It prints the baseline, the peak and their difference per flow, as a table
and as JSON, and exits 1 if any difference exceeds the budget (DESIGN.md section 6).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BUDGET_BYTES", "INPUT_BYTES", "main", "rss_bytes", "upload_long_wav", "wav_header"]

INPUT_BYTES = 150 * 1024 * 1024
BUDGET_BYTES = 100 * 1024 * 1024  # allowed growth above the baseline
UPLOAD_PART_BYTES = 16_000_000  # a whole number of 1-second units; >= S3's 5 MiB minimum
SAMPLE_EVERY_S = 0.005
ORG = "stream-bench"
MiB = 1024 * 1024


def wav_header(data_bytes: int, *, sample_rate: int = 16_000, channels: int = 1) -> bytes:
    """A 44-byte PCM s16le WAV header announcing `data_bytes` of samples."""
    align = 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * align, align, 16)
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", data_bytes)
    )


def upload_long_wav(s3_client: Any, bucket: str, key: str, total_bytes: int, unit: bytes) -> None:
    """Put a WAV of exactly `total_bytes` whose samples repeat `unit`, one part in memory.

    `unit` is raw s16le 16 kHz mono PCM of even length dividing UPLOAD_PART_BYTES.
    """
    data_bytes = total_bytes - 44
    body = unit * (UPLOAD_PART_BYTES // len(unit))
    upload = s3_client.create_multipart_upload(Bucket=bucket, Key=key)
    parts, sent = [], 0
    try:
        for number in range(1, total_bytes // UPLOAD_PART_BYTES + 2):
            part = body[: data_bytes - sent]
            if number == 1:
                part = wav_header(data_bytes) + part[: UPLOAD_PART_BYTES - 44]
            if not part:
                break
            sent += len(part) - (44 if number == 1 else 0)
            response = s3_client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=part
            )
            parts.append({"PartNumber": number, "ETag": response["ETag"]})
        s3_client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
        )
    except BaseException:
        s3_client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
        raise


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Samples RSS on a thread until stopped; `peak` is the highest value seen."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.peak = max(self.peak, rss_bytes())


async def _measure(services: Any, output: Path, input_bytes: int) -> dict[str, Any]:
    from blocks import ModelLimit
    from flows import stream_redact_pii, transcribe
    from modulate_flows.local import save_blocks
    from modulate_flows.samples import speech_wav
    from tasks.runner import RunSettings
    from tasks.s3 import S3Input

    bucket = "stream-bench"
    limits = {m: ModelLimit(concurrent=2) for m in ("stt", "stt-streaming", "pii-streaming")}
    await save_blocks(
        services.local, name=ORG, bucket=bucket, output_root=str(output), organization=ORG,
        api_key=f"key-{ORG}", limits=limits,
    )
    s3 = services.local.s3_client()
    services.local.upload(bucket, {"warm/small.wav": speech_wav(3.0, seed=1)})
    upload_long_wav(s3, bucket, "big/call.wav", input_bytes, speech_wav(1.0, seed=2)[44:])
    settings = RunSettings(credentials_block=ORG, limits_block=ORG, output_block=ORG)
    runs: list[tuple[str, Callable[..., Any]]] = [
        ("modulate-transcribe (routed to stt-streaming)", transcribe),
        ("modulate-stream-redact-pii", stream_redact_pii),
    ]
    startup = rss_bytes()
    for _, run in runs:  # warm-up: Prefect's engine and our code paths, on a 3 s file
        await run(source=S3Input(bucket_block=ORG, prefix="warm/"), settings=settings)
    results: dict[str, Any] = {"input_bytes": input_bytes, "budget_bytes": BUDGET_BYTES,
                               "rss_after_startup_bytes": startup, "flows": []}
    for name, run in runs:
        baseline = rss_bytes()
        started = time.perf_counter()
        with PeakSampler() as sampler:
            summary = await run(source=S3Input(bucket_block=ORG, prefix="big/"),
                                settings=settings)
        results["flows"].append({
            "flow": name,
            "files": summary.files,
            "seconds": round(time.perf_counter() - started, 2),
            "baseline_bytes": baseline,
            "peak_bytes": sampler.peak,
            "difference_bytes": sampler.peak - baseline,
            "peak_over_startup_bytes": sampler.peak - startup,
            "ratio_peak_to_baseline": round(sampler.peak / baseline, 3),
        })
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; `--input-mib N` changes the input size (to show it stays flat)."""
    args = sys.argv[1:] if argv is None else argv
    input_bytes = int(args[args.index("--input-mib") + 1]) * MiB if "--input-mib" in args else (
        INPUT_BYTES)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    import tempfile

    from prefect.testing.utilities import prefect_test_harness

    from bench.services import start_services

    with (
        start_services([ORG], concurrent=2) as services,
        prefect_test_harness(server_startup_timeout=120),
        tempfile.TemporaryDirectory(prefix="stream-memory-") as tmp,
    ):
        results = asyncio.run(_measure(services, Path(tmp) / "out", input_bytes))
    over = False
    print(f"input {input_bytes / MiB:.0f} MiB; budget {BUDGET_BYTES / MiB:.0f} MiB above "
          f"baseline; RSS after start-up {results['rss_after_startup_bytes'] / MiB:.1f} MiB")
    print(f"{'flow':48} {'s':>6} {'baseline':>9} {'peak':>9} {'diff':>8} {'ratio':>6}  files")
    for row in results["flows"]:
        over |= row["difference_bytes"] > BUDGET_BYTES or row["files"] != {"completed": 1}
        print(f"{row['flow']:48} {row['seconds']:6.1f} {row['baseline_bytes'] / MiB:8.1f}M "
              f"{row['peak_bytes'] / MiB:8.1f}M {row['difference_bytes'] / MiB:7.1f}M "
              f"{row['ratio_peak_to_baseline']:6.3f}  {row['files']}")
    print(json.dumps(results))
    if over:
        print("FAIL: a stream grew memory beyond the budget or did not complete", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
