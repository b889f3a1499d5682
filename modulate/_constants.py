"""Defaults for the Modulate clients: hosts, timeouts, size limits, formats and MIME types.

Every default lives here, not as a literal at a call site (API_CONTRACT.md §0.1, §0.3, §3, §9).
"""

from __future__ import annotations

import httpx

__all__ = [
    "BATCH_EXTENSIONS",
    "DEFAULT_BATCH_DEADLINE",
    "DEFAULT_BATCH_TIMEOUT",
    "DEFAULT_MODELS_BASE_URL",
    "DEFAULT_PLATFORM_BASE_URL",
    "DEFAULT_PLATFORM_DEADLINE",
    "DEFAULT_PLATFORM_TIMEOUT",
    "DEFAULT_STREAM_MAX_SIZE",
    "DEFAULT_STREAM_OPEN_TIMEOUT",
    "DEFAULT_STREAM_SILENCE_TIMEOUT",
    "MAX_BATCH_BYTES",
    "MAX_PLATFORM_BYTES",
    "MIME_TYPES",
    "PLATFORM_EXTENSIONS",
    "SVD_EXTENSIONS",
    "SVD_MIN_DURATION_MS",
]

DEFAULT_MODELS_BASE_URL = "https://modulate-developer-apis.com"
DEFAULT_PLATFORM_BASE_URL = "https://cloud-processing-api.modulate.ai"

# Batch inference can take long (a 60 s server limit is reported; third-party clients wait 300 s).
DEFAULT_BATCH_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_PLATFORM_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# httpx's timeouts bound each read, not the call: a server that trickles bytes, or answers
# slowly but never finishes, would hold a slot for ever. The whole call (send, answer, body)
# ends within these, as Transient.
DEFAULT_BATCH_DEADLINE = 360.0
DEFAULT_PLATFORM_DEADLINE = 120.0
DEFAULT_STREAM_OPEN_TIMEOUT = 10.0
# A stream's length follows its audio, so it has no overall deadline; instead the service may
# stay silent (no message at all) for at most this long, or the stream ends as Transient.
DEFAULT_STREAM_SILENCE_TIMEOUT = 120.0
# PII streaming sends MP3 windows as single binary frames; websockets' 1 MiB default is too small.
DEFAULT_STREAM_MAX_SIZE = 64 * 1024 * 1024

MAX_BATCH_BYTES = 100 * 1024 * 1024
MAX_PLATFORM_BYTES = 5 * 1024 * 1024
SVD_MIN_DURATION_MS = 500

BATCH_EXTENSIONS: frozenset[str] = frozenset(
    {"aac", "aiff", "flac", "mov", "mp3", "mp4", "ogg", "opus", "wav", "webm"}
)
SVD_EXTENSIONS: frozenset[str] = BATCH_EXTENSIONS | {
    "3gp", "3gpp", "amr", "au", "m4a", "wma",
}
PLATFORM_EXTENSIONS: frozenset[str] = frozenset({"mp3", "wav", "opus"})

# The server picks its decoder from the part's type; application/octet-stream is "strongly
# discouraged" (API_CONTRACT.md §0.3), so every supported extension has a real audio/video type.
MIME_TYPES: dict[str, str] = {
    "3gp": "video/3gpp",
    "3gpp": "video/3gpp",
    "aac": "audio/aac",
    "aiff": "audio/aiff",
    "amr": "audio/amr",
    "au": "audio/basic",
    "flac": "audio/flac",
    "m4a": "audio/mp4",
    "mov": "video/quicktime",
    "mp3": "audio/mpeg",
    "mp4": "video/mp4",
    "ogg": "audio/ogg",
    "opus": "audio/opus",
    "wav": "audio/wav",
    "webm": "video/webm",
    "wma": "audio/x-ms-wma",
}
