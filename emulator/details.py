"""Status codes, detail strings and close codes the emulator answers with, from API_CONTRACT.md.

One table per surface and detail family ("legacy" = older vendor pages, "2026" = the 2026-07-31
specs), so every string the vendor documents lives in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = [
    "BAD_CONFIG",
    "CORRUPT",
    "EMPTY",
    "FIVE_XX",
    "MISSING_KEY_2026",
    "SUPPORTED_EXTENSIONS",
    "SVD_EXTENSIONS",
    "TOO_LARGE",
    "TOO_SHORT",
    "Rejection",
    "StreamRejection",
    "batch_rejection",
    "bool_error",
    "int_error",
    "invalid_language",
    "missing_field",
    "stream_rejection",
    "unsupported_format",
]

SUPPORTED_EXTENSIONS: tuple[str, ...] = (
    ".aac", ".aiff", ".flac", ".mov", ".mp3", ".mp4", ".ogg", ".opus", ".wav", ".webm",
)
SVD_EXTENSIONS: tuple[str, ...] = (
    ".3gp", ".3gpp", ".aac", ".aiff", ".amr", ".au", ".flac", ".m4a", ".mov", ".mp3", ".mp4",
    ".ogg", ".opus", ".wav", ".webm", ".wma",
)

EMPTY = "The uploaded file is empty."
CORRUPT = "The audio could not be processed. It may be corrupted or in an unsupported format."
TOO_SHORT = "The audio is too short to analyze."
TOO_LARGE = "The uploaded file is too large. Maximum size is 100 MB."
BAD_CONFIG = "Invalid configuration."
NOT_PERMITTED = "This request is not permitted."
INSUFFICIENT = "Insufficient credits."

MISSING_KEY_2026: list[dict[str, Any]] = [
    {"loc": ["header", "X-API-Key"], "msg": "Field required", "type": "missing"}
]

# 5xx bodies the specs list per batch endpoint (API_CONTRACT.md §0.4 and §1-§4).
_500 = (500, "Internal server error")
_502a = (502, "Unable to validate request. Please try again.")
_502b = (502, "Unable to complete the request. Please try again.")
_503 = (503, "The service is temporarily unavailable. Please try again later.")
_504 = (504, "The request timed out. Please try again.")
FIVE_XX: dict[str, tuple[tuple[int, str], ...]] = {
    "stt": (_500, _502a, _502b),
    "vfast": (_500, _502a, _502b, _503, _504),
    "svd": (_500, _502a, _502b, _504),
    "pii": (_500, _502a, _502b),
    "platform": (_500,),
}


@dataclass(frozen=True)
class Rejection:
    """An HTTP rejection: status, JSON `detail` (string or list) and extra headers."""

    status: int
    detail: str | list[dict[str, Any]]
    headers: dict[str, str]


@dataclass(frozen=True)
class StreamRejection:
    """A WebSocket rejection: accept, then close with this code and reason."""

    code: int
    reason: str


_LEGACY_HTTP: dict[str, tuple[int, str]] = {
    "missing": (401, "Missing API key."),
    "auth": (401, "Invalid API key."),
    "not_enabled": (403, "Model access not enabled for this organization."),
    "monthly": (403, "Monthly usage limit reached."),
    "concurrency": (429, "Concurrent request limit exceeded."),
}


def batch_rejection(family: str, model: str, cls: str) -> Rejection:
    """The answer to a batch (or Platform limit) rejection of class `cls`.

    `cls` is one of "missing", "auth", "not_enabled", "monthly", "concurrency".
    """
    svd = model == "svd"
    if family == "legacy":
        status, detail = _LEGACY_HTTP[cls]
        if svd:  # "The SVD Batch endpoint returns 403 for both unauthorized keys and ... limits"
            status = 403
        headers = {"Retry-After": "1"} if cls == "concurrency" else {}
        return Rejection(status, detail, headers)
    if cls == "missing":
        return Rejection(422, MISSING_KEY_2026, {})
    if cls == "auth":
        return Rejection(403, NOT_PERMITTED, {}) if svd else Rejection(401, "Invalid API key.", {})
    if cls == "not_enabled" or svd:
        return Rejection(403, NOT_PERMITTED, {})
    return Rejection(429, INSUFFICIENT, {})


_LEGACY_WS: dict[str, tuple[int, str]] = {
    "missing": (4001, "Invalid API key"),
    "auth": (4001, "Invalid API key"),
    "not_enabled": (4003, "Model access not enabled for this organization."),
    "monthly": (4029, "Monthly usage limit reached."),
    "concurrency": (4029, "Concurrent connection limit exceeded."),
}
_2026_WS: dict[str, tuple[int, str]] = {
    "missing": (4003, NOT_PERMITTED),
    "auth": (4003, NOT_PERMITTED),
    "not_enabled": (4003, NOT_PERMITTED),
    "monthly": (4029, INSUFFICIENT),
    "concurrency": (4029, INSUFFICIENT),
}


def stream_rejection(family: str, model: str, cls: str) -> StreamRejection:
    """The close code and reason for a WebSocket rejection; SVD streaming uses 4003 for all."""
    code, reason = (_LEGACY_WS if family == "legacy" else _2026_WS)[cls]
    if model == "svd-streaming":
        code = 4003
    return StreamRejection(code, reason)


def unsupported_format(extensions: tuple[str, ...]) -> str:
    """The 400 detail for an extension outside `extensions`."""
    return f"Unsupported file format. Supported formats: {', '.join(extensions)}."


def invalid_language(value: str) -> str:
    """The 400 detail for a `language` value that is not an ISO 639-1 / BCP-47 code."""
    return f"Invalid language='{value}'. Expected an ISO 639-1 language code (e.g. 'en', 'fr')."


def missing_field(name: str) -> list[dict[str, Any]]:
    """FastAPI-style 422 detail for a missing form field."""
    return [{"loc": ["body", name], "msg": "Field required", "type": "missing"}]


def bool_error(name: str, value: str) -> list[dict[str, Any]]:
    """FastAPI-style 422 detail for a form field that is not a boolean."""
    return [{
        "loc": ["body", name],
        "msg": "Input should be a valid boolean, unable to interpret input",
        "type": "bool_parsing",
        "input": value,
    }]


def int_error(name: str, value: str) -> list[dict[str, Any]]:
    """FastAPI-style 422 detail for a form field that is not a non-negative integer."""
    return [{
        "loc": ["body", name],
        "msg": "Input should be a valid integer greater than or equal to 0",
        "type": "int_parsing",
        "input": value,
    }]
