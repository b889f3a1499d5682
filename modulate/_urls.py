"""Redaction of secrets from URLs and free text before they reach a log line or an exception."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["SECRET_QUERY_PARAMS", "redact_text", "redact_url"]

SECRET_QUERY_PARAMS: frozenset[str] = frozenset({"api_key", "apikey", "token"})
_MASK = "***"
# Matches `name=value` for a secret name anywhere in text (URLs inside messages, reprs).
_SECRET_IN_TEXT = re.compile(r"(?i)\b(api_key|apikey|token)=([^&\s'\"<>]*)")


def redact_url(url: str) -> str:
    """Return `url` with the values of its `api_key`, `apikey` and `token` parameters masked."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = [
        (name, _MASK if name.lower() in SECRET_QUERY_PARAMS else value)
        for name, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(pairs, safe="*")))


def redact_text(text: str) -> str:
    """Mask `api_key=...`-style secrets wherever they appear in free text."""
    return _SECRET_IN_TEXT.sub(lambda m: f"{m.group(1)}={_MASK}", text)
