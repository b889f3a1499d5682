"""Sample audio made in code: speech-like WAVs of varied lengths, and bad files.

Speech-like means a few harmonics under a syllable-rate amplitude envelope with
pauses, seeded so every sample is different and reproducible.
"""

from __future__ import annotations

import io
import math
import random
import wave
from array import array

__all__ = ["SAMPLE_RATE", "bad_files", "demo_files", "speech_wav"]

SAMPLE_RATE = 16_000


def speech_wav(seconds: float, seed: int, *, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV of `seconds` of speech-like sound, different for every seed."""
    rng = random.Random(seed)
    pitch = rng.uniform(90.0, 220.0)
    syllable_hz = rng.uniform(3.0, 5.0)
    n = int(seconds * sample_rate)
    samples = array("h", bytes(2 * n))
    for i in range(n):
        t = i / sample_rate
        envelope = max(0.0, math.sin(math.pi * syllable_hz * t)) ** 2
        if int(t * 1.3 + seed) % 5 == 0:  # a pause now and then, as between phrases
            envelope *= 0.05
        tone = sum(math.sin(2 * math.pi * pitch * k * t) / k for k in (1, 2, 3))
        samples[i] = int(9000 * envelope * tone / 1.8)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


def demo_files(count: int = 24, *, prefix: str = "calls/") -> dict[str, bytes]:
    """`count` good WAVs of 1 to 12 seconds, under dated sub-prefixes."""
    rng = random.Random(7)
    return {
        f"{prefix}2026-11-{1 + i % 3:02d}/call-{i:03d}.wav": speech_wav(
            rng.choice([1.0, 2.5, 4.0, 6.0, 12.0]), seed=i
        )
        for i in range(count)
    }


def bad_files(*, prefix: str = "calls/") -> dict[str, tuple[bytes, str]]:
    """Bad inputs a real bucket holds, each with the outcome the ledger records."""
    return {
        f"{prefix}bad/empty.wav": (b"", "failed: the file is empty"),
        f"{prefix}bad/corrupt.wav": (
            b"RIFX" + bytes(range(256)) * 8,
            "failed: the service cannot decode it",
        ),
        f"{prefix}bad/notes.wav": (
            b"meeting notes, not audio\n" * 40,
            "failed: a text file named .wav",
        ),
        f"{prefix}bad/blip.wav": (
            speech_wav(0.2, seed=999),
            "completed for transcription; failed as too short for synthetic-voice detection",
        ),
        f"{prefix}bad/readme.txt": (b"not audio", "skipped: extension not accepted"),
    }
