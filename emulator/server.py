"""Serving: a uvicorn `Server` in a background thread on 127.0.0.1 (tests, demo, benchmark),
or blocking in the foreground (CLI), after httpx's tests/conftest.py `serve_in_thread`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from socket import socket

import uvicorn
from fastapi import FastAPI

from emulator.app import create_app
from emulator.config import EmulatorConfig
from emulator.state import EmulatorState

__all__ = ["HOST", "RunningEmulator", "run_in_thread", "serve"]

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 2


@dataclass(frozen=True)
class RunningEmulator:
    """A started emulator: base URL, bound port, and its live state."""

    url: str
    port: int
    state: EmulatorState

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}"


class _Server(uvicorn.Server):
    """Signals the thread that started it once the sockets are bound."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    def install_signal_handlers(self) -> None:  # older uvicorn; newer skips non-main threads
        pass

    async def startup(self, sockets: list[socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()

    @property
    def bound_port(self) -> int:
        for server in self.servers:
            for sock in server.sockets:
                port: int = sock.getsockname()[1]
                return port
        raise RuntimeError("emulator has no bound socket")


def _uvicorn_config(app: FastAPI, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=HOST,
        port=port,
        log_level=log_level,
        lifespan="off",
        ws="websockets-sansio",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


@contextmanager
def run_in_thread(config: EmulatorConfig | None = None, port: int = 0) -> Iterator[RunningEmulator]:
    """Serve `config` on 127.0.0.1:`port` (0 = any free port) in a thread for the with-block."""
    app = create_app(config or EmulatorConfig.default())
    uv_config = _uvicorn_config(app, port, "warning")
    server = _Server(uv_config)
    thread = threading.Thread(target=server.run, name="modulate-emulator", daemon=True)
    thread.start()
    try:
        while not server.ready.wait(timeout=0.05):
            if not thread.is_alive():
                raise RuntimeError(f"emulator failed to start on {HOST}:{port}")
            if server.should_exit:
                raise RuntimeError("emulator stopped during startup")
        if server.should_exit:  # startup failed (e.g. port in use) after setting ready
            raise RuntimeError(f"emulator failed to start on {HOST}:{port}")
        bound = server.bound_port
        yield RunningEmulator(url=f"http://{HOST}:{bound}", port=bound, state=app.state.emulator)
    finally:
        server.should_exit = True
        thread.join(timeout=GRACEFUL_SHUTDOWN_S + 5)


def serve(config: EmulatorConfig | None = None, port: int = 8000, log_level: str = "info") -> None:
    """Serve in the foreground until interrupted (Ctrl-C)."""
    app = create_app(config or EmulatorConfig.default())
    uvicorn.Server(_uvicorn_config(app, port, log_level)).run()
