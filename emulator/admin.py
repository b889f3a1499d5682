"""Control and statistics routes under /_emulator (JSON, no auth; the emulator is local only).

The same operations exist as `EmulatorState` methods for in-process use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response

from emulator.config import MODELS
from emulator.state import EmulatorState

__all__ = ["PREFIX", "router"]

PREFIX = "/_emulator"

router = APIRouter(prefix=PREFIX)


def _state(request: Request) -> EmulatorState:
    state: EmulatorState = request.app.state.emulator
    return state


@router.get("/stats")
async def get_stats(request: Request) -> dict[str, Any]:
    """Counters per org and model, plus Platform submissions, polls and jobs."""
    return _state(request).stats()


# The three resets differ only in the `EmulatorState` method they run; each answers {"ok": true}.
_RESETS: dict[str, tuple[Callable[[EmulatorState], None], str]] = {
    "/stats/reset": (
        EmulatorState.reset_stats,
        "Zero the counters and max_in_flight; monthly usage is kept.",
    ),
    "/usage/reset": (
        EmulatorState.reset_usage,
        "The month rolls over: audio seconds used go back to 0 everywhere.",
    ),
    "/reset": (
        EmulatorState.reset,
        "Everything back to the start-up config: counters, usage, jobs, faults, limits.",
    ),
}


def _reset_route(
    action: Callable[[EmulatorState], None],
) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    async def route(request: Request) -> dict[str, Any]:
        action(_state(request))
        return {"ok": True}

    return route


for _path, (_action, _doc) in _RESETS.items():
    router.add_api_route(
        _path, _reset_route(_action), methods=["POST"], name=_action.__name__, description=_doc
    )


@router.get("/config")
async def get_config(request: Request) -> dict[str, Any]:
    """The live config (keys included: the emulator is a local test double)."""
    return _state(request).config.model_dump()


@router.patch("/config")
async def patch_config(request: Request) -> Response:
    """Change any of latency, faults, detail_family, platform_job_seconds, platform_wire."""
    state = _state(request)
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object")
        state.patch_config(changes)
    except (ValueError, ValidationError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse(state.config.model_dump(exclude={"orgs"}))


@router.patch("/orgs/{org}/models/{model}")
async def patch_model(org: str, model: str, request: Request) -> Response:
    """Change any of enabled, concurrent, monthly_audio_hours of one org and model."""
    state = _state(request)
    if model not in MODELS:
        return JSONResponse({"detail": f"Unknown model {model!r}."}, status_code=404)
    try:
        state.config.org(org)
    except KeyError:
        return JSONResponse({"detail": f"Unknown org {org!r}."}, status_code=404)
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object")
        limits = state.patch_model(org, model, changes)
    except (ValueError, ValidationError) as exc:
        return JSONResponse({"detail": str(exc)}, status_code=400)
    return JSONResponse(limits)
