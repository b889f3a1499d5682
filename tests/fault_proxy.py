"""An HTTP reverse proxy with fault switches, for injecting failures at a real boundary.

It forwards every request to `upstream` unless a rule matches (method and path pattern),
in which case it answers with the rule's status instead, `times` times (or until cleared).
`hold()` keeps matching requests from going upstream until the test lets them go, so that
a test can act while a request is in flight. Runs uvicorn on 127.0.0.1 in a thread of its
own.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from dataclasses import dataclass

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["FaultProxy"]


@dataclass
class _Rule:
    method: str
    path: re.Pattern[str]
    status: int
    times: int | None
    headers: dict[str, str]
    hits: int = 0


class FaultProxy:
    """Forward to `upstream`; `fail()` makes matching requests answer `status` instead."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.forwarded: list[tuple[str, str, bytes]] = []  # (method, path, body)
        self._holds: list[tuple[str, re.Pattern[str], threading.Event]] = []
        self.held = 0  # requests waiting at a hold now
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(routes=[Route("/{path:path}", self._handle, methods=[
            "GET", "POST", "PUT", "PATCH", "DELETE"])])
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def fail(
        self, method: str, path: str, status: int, times: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Rule:
        """Answer `status` (with `headers`) to requests whose path matches the regex `path`."""
        rule = _Rule(method.upper(), re.compile(path), status, times, headers or {})
        with self._lock:
            self._rules.append(rule)
        return rule

    def hold(self, method: str, path: str) -> threading.Event:
        """Keep matching requests back until the returned event is set (at most 30 s)."""
        released = threading.Event()
        with self._lock:
            self._holds.append((method.upper(), re.compile(path), released))
        return released

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
            for _, _, released in self._holds:
                released.set()
            self._holds.clear()

    def start(self) -> FaultProxy:
        self._thread.start()
        for _ in range(200):  # bounded: 10 s
            if self._server.started:
                return self
            threading.Event().wait(0.05)
        raise RuntimeError("the fault proxy did not start within 10 s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _match(self, method: str, path: str) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.method == method and rule.path.search(path):
                    if rule.times is not None and rule.hits >= rule.times:
                        continue
                    rule.hits += 1
                    return rule
        return None

    async def _handle(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        rule = self._match(request.method, path)
        if rule is not None:
            return JSONResponse(
                {"detail": "injected fault"}, status_code=rule.status, headers=rule.headers
            )
        body = await request.body()  # all of it sent: the server gets it even if the client
        await self._wait_at_holds(request.method, path)  # gives up waiting for the answer
        self.forwarded.append((request.method, path, body))
        async with httpx.AsyncClient(timeout=30) as client:
            upstream = await client.request(
                request.method,
                f"{self.upstream}{path}",
                params=request.query_params,
                content=body,
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            )
        headers = {
            k: v for k, v in upstream.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding")
        }
        return Response(upstream.content, status_code=upstream.status_code, headers=headers)

    async def _wait_at_holds(self, method: str, path: str) -> None:
        with self._lock:
            events = [e for m, pattern, e in self._holds if m == method and pattern.search(path)]
        for released in events:
            self.held += 1
            try:
                await asyncio.to_thread(released.wait, 30)  # bounded: a test that forgets
            finally:
                self.held -= 1


async def until(condition, *, what: str, timeout: float = 30.0) -> None:
    """Wait until `condition()` holds; fail naming `what` after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)
