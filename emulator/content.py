"""Deterministic "model output": transcripts, SVD frames, PII redactions and fake MP3 bytes.

Everything is a function of the sha256 of audio blocks (see `emulator.audio.AudioStream`), so the
same bytes always give the same answer, batch or streamed, and different bytes differ. Silent
(all-zero) blocks hold no speech. The first utterance of each file carries a fake name, which
PII redaction replaces by `<pii:name></pii:name>` and `pii_phi_tagging` wraps in tags.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from emulator.audio import Block

__all__ = [
    "ACCENTS",
    "EMOTIONS",
    "MIN_UTTERANCE_MS",
    "NAME_MARKER",
    "Transcriber",
    "TranscriptOptions",
    "fake_mp3",
    "is_synthetic",
    "svd_frame",
]

MIN_UTTERANCE_MS = 250
NAME_MARKER = "<pii:name></pii:name>"
MP3_BYTES_PER_MS = 4  # 32 kbps

WORDS: tuple[str, ...] = (
    "the", "call", "account", "today", "please", "order", "number", "check", "morning", "thanks",
    "service", "help", "issue", "payment", "update", "team", "meeting", "report", "quarter",
    "results", "delivery", "customer", "support", "question", "answer", "system", "review",
    "schedule", "project", "agent", "policy", "claim", "refund", "ticket", "email", "address",
    "phone", "billing", "plan", "upgrade", "cancel", "confirm", "details", "moment", "minute",
    "record", "notes", "follow", "again", "later", "right", "sure", "okay", "great", "really",
    "good", "next", "week", "monday", "friday", "office", "manager", "price", "contract",
)
NAMES: tuple[str, ...] = (
    "Alice Martin", "Bob Chen", "Carla Diaz", "David Okafor", "Emma Novak", "Farid Haddad",
    "Grace Kim", "Henry Walsh", "Ines Moreau", "Jonas Berg", "Keiko Sato", "Liam Byrne",
    "Maya Patel", "Nils Larsen", "Olga Petrova", "Pablo Ruiz",
)
EMOTIONS: tuple[str, ...] = (
    "Neutral", "Calm", "Happy", "Amused", "Excited", "Proud", "Affectionate", "Interested",
    "Hopeful", "Frustrated", "Angry", "Contemptuous", "Concerned", "Afraid", "Sad", "Ashamed",
    "Bored", "Tired", "Surprised", "Anxious", "Stressed", "Disgusted", "Disappointed",
    "Confused", "Relieved", "Confident",
)
ACCENTS: tuple[str, ...] = (
    "American", "British", "Australian", "Southern", "Indian", "Irish", "Scottish",
    "Eastern_European", "African", "Asian", "Latin_American", "Middle_Eastern", "Unknown",
)


@dataclass(frozen=True)
class TranscriptOptions:
    """Which optional fields to fill; `redact` switches to the PII utterance shape."""

    speaker_diarization: bool = True
    emotion_signal: bool = False
    accent_signal: bool = False
    deepfake_signal: bool = False
    pii_phi_tagging: bool = False
    partial_results: bool = False
    language: str = "en"
    redact: bool = False
    start_redaction_padding_ms: int = 100
    end_redaction_padding_ms: int = 0


class Transcriber:
    """Turns blocks into utterances, one per non-silent block of at least MIN_UTTERANCE_MS."""

    def __init__(self, options: TranscriptOptions) -> None:
        self.options = options
        self.utterances: list[dict[str, Any]] = []
        self.redaction_ranges: list[list[int]] = []

    @property
    def text(self) -> str:
        return " ".join(u["text"] for u in self.utterances)

    def utterance(self, block: Block) -> dict[str, Any] | None:
        """The utterance spoken in `block`, or None for silence or a too-short tail."""
        if block.silent or block.duration_ms < MIN_UTTERANCE_MS:
            return None
        opts, d, k = self.options, block.digest, len(self.utterances)
        words = [WORDS[d[1 + i] % len(WORDS)] for i in range(3 + d[0] % 6)]
        lead = d[20] % 150 if block.duration_ms >= 1000 else 0
        tail = d[21] % 250 if block.duration_ms >= 1000 else 0
        start_ms, duration_ms = block.start_ms + lead, block.duration_ms - lead - tail
        name_at: int | None = None
        if k == 0:  # the first utterance of each file mentions a (fake) person
            name_at = 1 + d[22] % len(words)
            name = NAMES[d[23] % len(NAMES)]
            if opts.redact:
                token = NAME_MARKER
            elif opts.pii_phi_tagging:
                token = f"<pii:name>{name}</pii:name>"
            else:
                token = name
            words.insert(name_at, token)
        text = " ".join(words)
        text = text[0].upper() + text[1:] + "."
        uid = hashlib.sha256(b"utterance" + d + k.to_bytes(4, "big")).digest()[:16]
        utt: dict[str, Any] = {
            "utterance_uuid": str(uuid.UUID(bytes=uid, version=4)),
            "text": text,
            "start_ms": start_ms,
            "duration_ms": duration_ms,
            "speaker": 1 + k % 2 if opts.speaker_diarization else 1,
            "language": opts.language,
        }
        if not opts.redact:
            utt["emotion"] = EMOTIONS[d[24] % len(EMOTIONS)] if opts.emotion_signal else None
            utt["accent"] = ACCENTS[d[25] % len(ACCENTS)] if opts.accent_signal else None
            deepfake = opts.deepfake_signal and duration_ms >= 500
            utt["deepfake_score"] = round(d[26] / 255, 4) if deepfake else None
        if name_at is not None and opts.redact:
            per_word = duration_ms / len(words)
            s = start_ms + int(per_word * name_at) - opts.start_redaction_padding_ms
            e = start_ms + int(per_word * (name_at + 1)) + opts.end_redaction_padding_ms
            self.redaction_ranges.append([max(0, s), e])
        self.utterances.append(utt)
        return utt

    def partial(self, utterance: dict[str, Any]) -> dict[str, Any]:
        """A partial_utterance payload: the first half of the words of `utterance`."""
        words = utterance["text"].split(" ")
        return {
            "text": " ".join(words[: max(1, len(words) // 2)]),
            "start_ms": utterance["start_ms"],
            "speaker": utterance["speaker"],
            "emotion": None,
            "accent": None,
            "deepfake_score": None,
        }

    def clamp_ranges(self, duration_ms: int) -> list[list[int]]:
        """Redaction ranges clamped to the file's duration."""
        return [[min(s, duration_ms), min(e, duration_ms)] for s, e in self.redaction_ranges]


def is_synthetic(head_digest: bytes) -> bool:
    """Roughly one file in three is judged synthetic (from the hash of its first 0.5 s)."""
    return head_digest[0] % 3 == 0


def svd_frame(
    start_ms: int, end_ms: int, *, synthetic: bool, digest: bytes, silent: bool
) -> dict[str, Any]:
    """One SVD frame; silent windows are `no-content` with confidence 1.0."""
    if silent:
        verdict, confidence = "no-content", 1.0
    else:
        verdict = "synthetic" if synthetic else "non-synthetic"
        confidence = round(0.6 + 0.4 * int.from_bytes(digest[:2], "big") / 65535, 4)
    return {"start_time_ms": start_ms, "end_time_ms": end_ms, "verdict": verdict,
            "confidence": confidence}


def fake_mp3(seed: bytes, duration_ms: int) -> bytes:
    """Deterministic stand-in for redacted MP3: an ID3 header then ~32 kbps of filler bytes."""
    header = b"ID3\x04\x00\x00\x00\x00\x00\x00"
    size = max(0, duration_ms) * MP3_BYTES_PER_MS
    block = b"".join(hashlib.sha256(seed + i.to_bytes(2, "big")).digest() for i in range(128))
    body = block * (size // len(block) + 1)
    return header + body[:size]
