"""The app factory: one FastAPI app per config, with batch, streaming, Platform and admin routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from emulator import admin, batch, platform, streaming
from emulator.batch import DroppedConnection
from emulator.config import EmulatorConfig
from emulator.state import EmulatorState

__all__ = ["create_app"]


def create_app(config: EmulatorConfig | None = None) -> FastAPI:
    """A Modulate-compatible app; its live state is `app.state.emulator` (an EmulatorState)."""
    app = FastAPI(title="Modulate emulator", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.emulator = EmulatorState(config or EmulatorConfig.default())
    app.include_router(batch.router)
    app.include_router(streaming.router)
    app.include_router(platform.router)
    app.include_router(admin.router)
    _quiet_dropped_connections()
    return app


class _DropFilter(logging.Filter):
    """Hide uvicorn's traceback for connections we drop on purpose (fault injection)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DroppedConnection)


def _quiet_dropped_connections() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _DropFilter) for f in logger.filters):
        logger.addFilter(_DropFilter())
