"""Private base of `BatchClient` and `PlatformClient`, shaped like httpx's `BaseClient`.

It holds the `async with` lifecycle (a state enum that refuses reuse after close, like httpx
`ClientState`) and the one `_send()` that does I/O: every failure goes through `classify()` and
the response is closed on any exception. Subclasses only build requests and pick a parser.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from httpx_aiohttp import HttpxAiohttpClient
from pydantic import BaseModel, SecretStr, ValidationError

from .errors import Transient, UnreadableResponse, classify

__all__: list[str] = []

logger = logging.getLogger(__name__)

# httpx keeps only 20 idle connections by default: with more calls in flight (an org's
# limit is often 25 or more), every response that lands while 20 others sit idle closes
# its connection, and the next call opens a new one (~90% of calls did in bench/).
# Keeping as many as may be open makes every call reuse one.
_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)


def _default_client() -> httpx.AsyncClient:
    """The httpx client a Modulate client makes when given none: httpx's API over aiohttp.

    httpcore's pool scans every connection, and for each idle one all of them again, twice
    per request: at 25 calls in flight that was a quarter of our loop's CPU under the
    profiler. aiohttp's pool hands a connection out in constant time (0.5 ms of CPU less per
    file at N = 2,000, bench/). httpx still builds the requests, decodes the responses and
    raises its own exceptions; env proxies (HTTPS_PROXY, NO_PROXY) are honoured as before.
    """
    return HttpxAiohttpClient(limits=_LIMITS)


_T = TypeVar("_T")
_M = TypeVar("_M", bound=BaseModel)


class _State(enum.Enum):
    UNOPENED = 1
    OPENED = 2
    CLOSED = 3


class _BaseHTTPClient:
    """Lifecycle and `_send()` shared by the HTTP clients; not public API."""

    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str,
        timeout: httpx.Timeout,
        deadline: float,
        http_client: httpx.AsyncClient | None,
    ) -> None:
        _check_api_key(api_key)
        if deadline <= 0:
            raise ValueError("deadline must be positive (seconds)")
        self._deadline = deadline
        self._api_key = api_key
        self._base_url = base_url.rstrip("/")
        self._timeout = timeout
        self._owns_client = http_client is None
        self._client = http_client if http_client is not None else _default_client()
        self._state = _State.UNOPENED

    async def __aenter__(self) -> Self:
        if self._state is not _State.UNOPENED:
            raise RuntimeError(f"a {type(self).__name__} can be opened once only")
        self._state = _State.OPENED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client (and its connection pool, if it made it)."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self._owns_client:
            await self._client.aclose()

    async def _send(
        self, endpoint: str, request: httpx.Request, parse: Callable[[httpx.Response], _T]
    ) -> _T:
        if self._state is _State.CLOSED:
            raise RuntimeError(
                f"Cannot send a request, as the {type(self).__name__} has been closed."
            )
        request.extensions["timeout"] = self._timeout.as_dict()
        try:
            async with asyncio.timeout(self._deadline):
                return await self._send_once(endpoint, request, parse)
        except TimeoutError:
            logger.debug("%s: no complete answer within %g s", endpoint, self._deadline)
            raise Transient(
                f"{endpoint}: no complete answer within {self._deadline:g} s",
                endpoint=endpoint,
                detail="deadline exceeded",
            ) from None

    async def _send_once(
        self, endpoint: str, request: httpx.Request, parse: Callable[[httpx.Response], _T]
    ) -> _T:
        try:
            response = await self._client.send(request)
        except httpx.HTTPError as exc:
            error = classify(endpoint=endpoint, exc=exc)
            logger.debug("%s: %s", endpoint, type(error).__name__)
            raise error from exc
        try:
            if not response.is_success:
                error = classify(
                    endpoint=endpoint,
                    status=response.status_code,
                    detail=_error_detail(response),
                    headers=response.headers,
                )
                logger.debug(
                    "%s: HTTP %s -> %s", endpoint, response.status_code, type(error).__name__
                )
                raise error
            try:
                return parse(response)
            except (ValueError, ValidationError, KeyError) as exc:
                # The service answered 2xx: it did the work and billed it, so this is never
                # sent again (a retry would pay twice). Size and type only: the body could
                # hold a transcript.
                content_type = response.headers.get("content-type", "none")
                raise UnreadableResponse(
                    f"{endpoint}: unreadable response (HTTP {response.status_code}, "
                    f"{len(response.content)} bytes, content type {content_type}; "
                    f"{type(exc).__name__})",
                    endpoint=endpoint,
                    status=response.status_code,
                    detail="unreadable response",
                ) from None
        finally:
            await response.aclose()


def _check_api_key(api_key: SecretStr) -> None:
    if not isinstance(api_key, SecretStr) or not api_key.get_secret_value():
        raise ValueError("api_key must be a non-empty pydantic SecretStr")


def _json_parser(model: type[_M]) -> Callable[[httpx.Response], _M]:
    def parse(response: httpx.Response) -> _M:
        return model.model_validate(response.json())

    return parse


# Velma-2 answers {"detail": ...}; the Platform API's error envelope is unknown
# (API_CONTRACT.md 9.2), so the other usual names are read too, in this order.
_ERROR_FIELDS = ("detail", "error", "message")


def _error_detail(response: httpx.Response) -> Any:
    """The JSON error text of an error response; never the raw body (it could hold a
    transcript)."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    return next((body[name] for name in _ERROR_FIELDS if body.get(name) is not None), None)
