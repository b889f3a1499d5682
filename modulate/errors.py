"""The error taxonomy of the Modulate clients, and `classify()`: where a signal gets its meaning.

Every failure of a call (HTTP status, WebSocket close code, `detail`/`error` text, transport
exception) becomes exactly one of these classes before anything decides whether to retry:

* ModulateError
  + ConcurrencyLimited     - too many calls at once (or ambiguous: `quota_suspect=True`,
  |                          and `access_suspect=True` where a bad key answers the same)
  + MonthlyLimitReached    - the org's monthly usage (credits) for the model is used up
  + AuthError              - the key is missing or wrong
  |  + ModelNotEnabled     - the key is valid but the model is not enabled for the org
  + BadInput               - this file or these parameters will never succeed
  + Transient              - 5xx, timeouts, dropped connections: retry a few times
  + UnreadableResponse     - a 2xx whose body cannot be read: done and billed, never re-sent

Misuse of the client (a wrong argument) raises `ValueError`, outside this tree.
Every exception carries only log-safe context: never a URL with its key, never a response body
that could hold a transcript.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import websockets.datastructures
import websockets.exceptions

from ._retry_after import parse_retry_after
from ._urls import redact_text, redact_url

__all__ = [
    "AuthError",
    "BadInput",
    "ConcurrencyLimited",
    "ModelNotEnabled",
    "ModulateError",
    "MonthlyLimitReached",
    "Transient",
    "UnreadableResponse",
    "classify",
    "redact_url",
]

_MAX_DETAIL_CHARS = 300


class ModulateError(Exception):
    """Base class of every failure reported by the Modulate APIs (or on the way to them)."""

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        status: int | None = None,
        close_code: int | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.close_code = close_code
        self.detail = detail
        self.retry_after = retry_after

    def _context(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "status": self.status,
            "close_code": self.close_code,
            "detail": self.detail,
            "retry_after": self.retry_after,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only context would be lost by Exception's default pickling (Prefect pickles
        # task results and exceptions across processes).
        return (_rebuild, (type(self), self.message, self._context()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class ConcurrencyLimited(ModulateError):
    """Too many calls at once: 429 on STT/VFast batch, 403 on SVD batch, 4029/4003 on streams.

    The pipeline waits a few seconds with jitter (or Retry-After) and retries without counting it
    against the file's retry budget. `quota_suspect=True` means the signal could also be the
    monthly limit, and `access_suspect=True` that it could also be a bad key or a model not
    enabled (a 403 or 4003 that does not say why): the run's ModelGate (modulate/gate.py)
    decides on evidence.
    """

    def __init__(
        self,
        message: str,
        *,
        quota_suspect: bool = False,
        access_suspect: bool = False,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.quota_suspect = quota_suspect
        self.access_suspect = access_suspect

    def _context(self) -> dict[str, Any]:
        return {
            **super()._context(),
            "quota_suspect": self.quota_suspect,
            "access_suspect": self.access_suspect,
        }


class MonthlyLimitReached(ModulateError):
    """The org's monthly usage limit for this model is reached (403/4029/4003 with quota words).

    Never retried: the breaker for org+model opens and every unsent file is deferred.
    """


class AuthError(ModulateError):
    """The API key is missing or invalid (401, 422 on the X-API-Key header, 4001).

    The run stops at once with a message naming the credential setting to fix.
    """


class ModelNotEnabled(AuthError):
    """The key is valid but the model is not enabled for the org (403/4003 "not enabled").

    The run stops at once; ask the org administrator to enable the model.
    """


class BadInput(ModulateError):
    """This file or these parameters can never succeed: 400, 404, 409, 413, 422, 1003, 4002,
    and the local pre-checks (empty, over 100 MB, wrong extension, SVD under 0.5 s).

    A per-file permanent failure; the batch goes on.
    """


class Transient(ModulateError):
    """A failure that may pass: 5xx, timeouts, dropped connections, 1011, abnormal closure.

    Retried with bounded exponential backoff and jitter, then a per-file failure.
    """


class UnreadableResponse(ModulateError):
    """A 2xx answer whose body does not parse: the service did (and billed) the work.

    Never retried (`decide()` gives up on it): the file is `failed` with the body's size and
    content type, and a rerun sends it again only because the ledger says failed.
    """


def _rebuild(cls: type[ModulateError], message: str, context: dict[str, Any]) -> ModulateError:
    return cls(message, **context)


# --- the classification table --------------------------------------------------------------------

_AUTH = re.compile(
    r"invalid api[ _-]?key|missing api[ _-]?key|x-api-key|api[_-]?key|accountuuid|unauthori"
    r"|invalid credentials|authentication failed|invalid key",
    re.IGNORECASE,
)
_MONTHLY = re.compile(r"monthly|usage limit|quota", re.IGNORECASE)
_CONCURRENCY = re.compile(r"concurren|too many|rate limit", re.IGNORECASE)
_CREDITS = re.compile(r"insufficient credit|credits?\b", re.IGNORECASE)
# Not the bare word "access": "Access denied" is also how a used-up limit may read ("usage
# denied", the vendor's page), so it is weighed as a bare 403 is.
_NOT_ENABLED = re.compile(r"not enabled|no access|access disabled", re.IGNORECASE)
_BAD_INPUT = re.compile(
    r"too short|could not be processed|unsupported|empty|invalid language|invalid configuration"
    r"|invalid request|invalid input|audio_format|sample_rate|num_channels|does not match"
    r"|too large|not found|already finalized",
    re.IGNORECASE,
)

_LIMIT_STATUSES = frozenset({403, 429})
_LIMIT_CODES = frozenset({4003, 4029})
_ANY = None


@dataclass(frozen=True)
class _Rule:
    """One row: signal kind ("http", "close", "message"), values, detail pattern."""

    kind: str
    values: frozenset[int] | None
    pattern: re.Pattern[str] | None
    cls: type[ModulateError]
    quota_suspect: bool = False
    access_suspect: bool = False


def _r(
    kind: str,
    values: set[int] | frozenset[int] | None,
    pattern: re.Pattern[str] | None,
    cls: type[ModulateError],
    *,
    quota_suspect: bool = False,
    access_suspect: bool = False,
) -> _Rule:
    frozen = None if values is None else frozenset(values)
    return _Rule(kind, frozen, pattern, cls, quota_suspect, access_suspect)


# Ordered most specific first; the first row that matches wins. Detail patterns are checked in
# the order auth > monthly > concurrency > credits > not enabled, because
# "Model access not enabled" and "Monthly usage limit" must not fall to a looser word.
_RULES: tuple[_Rule, ...] = (
    # HTTP (batch, Platform, and a refused WebSocket handshake)
    _r("http", {401}, _ANY, AuthError),
    _r("http", {422}, _AUTH, AuthError),  # 2026: loc ["header", "X-API-Key"], "Field required"
    _r("http", _LIMIT_STATUSES, _AUTH, AuthError),  # SVD legacy: 403 "Invalid API key."
    _r("http", _LIMIT_STATUSES, _MONTHLY, MonthlyLimitReached),
    _r("http", _LIMIT_STATUSES, _CONCURRENCY, ConcurrencyLimited),
    _r("http", _LIMIT_STATUSES, _CREDITS, ConcurrencyLimited, quota_suspect=True),
    _r("http", {403}, _NOT_ENABLED, ModelNotEnabled),
    # A 403 that does not say why ("This request is not permitted.") is a model not enabled
    # or a usage limit exceeded (the vendor's auth page), and on SVD a bad key too: the gate
    # weighs it with what the run saw (modulate/gate.py, rules 2 and 6).
    _r("http", {403}, _ANY, ConcurrencyLimited, quota_suspect=True, access_suspect=True),
    _r("http", {429}, _ANY, ConcurrencyLimited, quota_suspect=True),
    _r("http", {400, 404, 409, 413, 415, 422}, _ANY, BadInput),
    _r("http", {408, 425}, _ANY, Transient),
    # WebSocket close codes
    _r("close", {4001}, _ANY, AuthError),
    _r("close", _LIMIT_CODES, _AUTH, AuthError),
    _r("close", _LIMIT_CODES, _MONTHLY, MonthlyLimitReached),
    _r("close", _LIMIT_CODES, _CONCURRENCY, ConcurrencyLimited),
    _r("close", _LIMIT_CODES, _CREDITS, ConcurrencyLimited, quota_suspect=True),
    _r("close", {4003}, _NOT_ENABLED, ModelNotEnabled),
    # "Model access not enabled, or usage denied" (STT), "Authentication failed or usage
    # denied" (SVD), "could not be validated or is not permitted" (spec): as a bare 403.
    _r("close", {4003}, _ANY, ConcurrencyLimited, quota_suspect=True, access_suspect=True),
    _r("close", {4029}, _ANY, ConcurrencyLimited, quota_suspect=True),
    _r("close", {1003, 1007, 1009, 4002}, _ANY, BadInput),
    # A stream `error` message without a telling close code, or detail alone
    _r("message", _ANY, _AUTH, AuthError),
    _r("message", _ANY, _MONTHLY, MonthlyLimitReached),
    _r("message", _ANY, _CONCURRENCY, ConcurrencyLimited),
    _r("message", _ANY, _CREDITS, ConcurrencyLimited, quota_suspect=True),
    _r("message", _ANY, _NOT_ENABLED, ModelNotEnabled),
    _r("message", _ANY, _BAD_INPUT, BadInput),
)


def classify(
    *,
    endpoint: str,
    status: int | None = None,
    close_code: int | None = None,
    detail: object = None,
    headers: Mapping[str, str] | None = None,
    exc: BaseException | None = None,
) -> ModulateError:
    """Translate one failure signal into its ModulateError; pure, no I/O.

    Args:
        endpoint: short model name ("stt", "vfast", "svd", "pii", "stt-streaming",
            "svd-streaming", "pii-streaming", "platform").
        status: HTTP status of a failed response.
        close_code: WebSocket close code.
        detail: the server's `detail` (string, or FastAPI list of {loc, msg, type}) or a stream
            `error` text / close reason.
        headers: response headers (for Retry-After).
        exc: a transport exception (httpx, websockets, OSError, TimeoutError) to classify.

    What a signal cannot tell (is a 429 "Insufficient credits." the month or a burst?) is left
    to the run's ModelGate, which weighs it with the calls in flight and the successes seen.

    Unmatched defaults: an HTTP 5xx or other non-4xx status, an unmatched close code, an
    unknown exception and a signal-free call give Transient; an unmatched HTTP 4xx gives BadInput.
    """
    if exc is not None:
        found = _from_exception(endpoint, exc, detail)
        if isinstance(found, ModulateError):
            return found
        status, close_code, detail, headers = found
    text = _detail_text(detail)
    retry_after = parse_retry_after(_header(headers, "retry-after"))
    context: dict[str, Any] = {
        "endpoint": endpoint,
        "status": status,
        "close_code": close_code,
        "detail": text,
        "retry_after": retry_after,
    }
    rule = _match(status, close_code, text)
    if rule is None:
        if status is not None and 400 <= status < 500:
            return BadInput(_message(BadInput, context), **context)
        return Transient(_message(Transient, context), **context)
    if rule.cls is ConcurrencyLimited:
        return ConcurrencyLimited(
            _message(ConcurrencyLimited, context, rule.quota_suspect),
            quota_suspect=rule.quota_suspect,
            access_suspect=rule.access_suspect,
            **context,
        )
    return rule.cls(_message(rule.cls, context), **context)


def _match(status: int | None, code: int | None, text: str | None) -> _Rule | None:
    if status is not None:
        kind, value = "http", status
    elif code is not None:
        kind, value = "close", code
    else:
        kind, value = "message", None
    for rule in _RULES:
        if rule.kind != kind:
            continue
        if rule.values is not None and value not in rule.values:
            continue
        if rule.pattern is not None and (text is None or not rule.pattern.search(text)):
            continue
        return rule
    if kind == "close" and text:  # an unknown close code with a telling reason
        return _match(None, None, text)
    return None


_Found = tuple[int | None, int | None, object, Mapping[str, str] | None]


def _from_exception(endpoint: str, exc: BaseException, detail: object) -> _Found | ModulateError:
    """Signals from a transport exception, or the Transient it stands for."""
    if isinstance(exc, websockets.exceptions.InvalidStatus):
        response = exc.response
        return (response.status_code, None, _json_detail(response.body) or detail, response.headers)
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        if exc.rcvd is None:  # abnormal closure: no close frame received
            return _transient(endpoint, "connection closed abnormally", exc)
        reason = exc.rcvd.reason
        combined = " ".join(p for p in (_detail_text(detail), reason) if p) or None
        return (None, exc.rcvd.code, combined, None)
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        return (response.status_code, None, detail, response.headers)
    # httpx.TimeoutException, httpx.TransportError (ConnectError, ReadError, RemoteProtocolError),
    # websockets handshake/protocol errors, OSError, TimeoutError and anything unforeseen.
    if isinstance(exc, httpx.TransportError) and exc.__cause__ is not None:
        # The transport's own error says what happened: the aiohttp transport maps a server
        # that hung up to ConnectTimeout (modulate/_http.py), httpcore's names match httpx's.
        return _transient(endpoint, type(exc.__cause__).__name__, exc.__cause__)
    return _transient(endpoint, type(exc).__name__, exc)


def _transient(endpoint: str, what: str, exc: BaseException) -> Transient:
    text = _truncate(redact_text(f"{what}: {exc}" if str(exc) else what))
    context: dict[str, Any] = {"endpoint": endpoint, "detail": text}
    return Transient(_message(Transient, context), **context)


def _json_detail(body: bytes | None) -> object:
    if not body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data.get("detail") if isinstance(data, dict) else None


def _detail_text(detail: object) -> str | None:
    """A short, log-safe text from a string or FastAPI list detail (loc and msg only)."""
    if detail is None:
        return None
    if isinstance(detail, str):
        text = detail
    elif isinstance(detail, list):
        items = []
        for item in detail:
            if isinstance(item, Mapping):
                loc = ".".join(str(p) for p in item.get("loc", ()) or ())
                items.append(f"{loc}: {item.get('msg', '')}".strip(": "))
            else:
                items.append(str(item))
        text = "; ".join(items)
    elif isinstance(detail, Mapping) and "detail" in detail:
        return _detail_text(detail["detail"])
    else:
        text = str(detail)
    text = text.strip()
    return _truncate(redact_text(text)) if text else None


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if headers is None:
        return None
    if isinstance(headers, (httpx.Headers, websockets.datastructures.Headers)):
        return headers.get(name)
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


_HINTS: dict[type[ModulateError], str] = {
    AuthError: "check the API key setting (credentials block) for this endpoint",
    ModelNotEnabled: "ask the org administrator to enable this model for the org",
    MonthlyLimitReached: "no retry succeeds until the monthly period resets or the limit is raised",
    BadInput: "this file or these parameters will not succeed as they are",
}


def _message(cls: type[ModulateError], context: Mapping[str, Any], suspect: bool = False) -> str:
    signal = []
    if context.get("status") is not None:
        signal.append(f"HTTP {context['status']}")
    if context.get("close_code") is not None:
        signal.append(f"close code {context['close_code']}")
    head = f"{context['endpoint']}: " + (" ".join(signal) or cls.__name__)
    if context.get("detail"):
        head += f": {context['detail']}"
    hint = _HINTS.get(cls)
    if cls is ConcurrencyLimited and suspect:
        hint = "may also be the monthly limit, the key or the model's access (quota suspect)"
    return f"{head} ({hint})" if hint else head
