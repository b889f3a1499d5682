"""Reach Prefect before a command uses it, with a bound that fits a slow machine and a message.

Without PREFECT_API_URL, Prefect starts a temporary local server on first use and gives it
20 s (`PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`); creating a fresh SQLite database
on a busy 2-core machine took longer, and the first command died with a traceback. Here the
server is started once, up front, with a longer bound (unless that setting is set), under a
spinner that says what it waits for; a later `get_client()` finds it running
(`SubprocessASGIServer` is one instance per process, prefect/server/api/server.py).
"""

from __future__ import annotations

import time

import httpx
import typer
from rich.console import Console

__all__ = [
    "API_WAIT_SECONDS",
    "DEFAULT_STARTUP_SECONDS",
    "STARTUP_SETTING",
    "PrefectUnavailable",
    "connect",
    "connect_or_exit",
]

STARTUP_SETTING = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
# Prefect's default is 20 s; a first start (database creation and migrations) took up to
# ~40 s here with other work running. Three minutes leaves room; the setting overrides it.
DEFAULT_STARTUP_SECONDS = 180
API_WAIT_SECONDS = 30.0  # an already running server (PREFECT_API_URL) that does not answer
_HEALTH_POLL_SECONDS = 0.25
_HEALTH_REQUEST_TIMEOUT = httpx.Timeout(5.0)


class PrefectUnavailable(RuntimeError):
    """Prefect could not be reached or started; the message says what to do."""


def connect(console: Console) -> str:
    """Make sure a Prefect API answers, starting the local one if none is configured.

    Returns the API URL. Raises PrefectUnavailable, naming the setting to change.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return _wait_for_api(str(settings.api.url), console)
    ephemeral = settings.server.ephemeral
    if not ephemeral.enabled:
        raise PrefectUnavailable(
            "No Prefect API is configured: set PREFECT_API_URL to a running server "
            "(`prefect server start`), or PREFECT_SERVER_EPHEMERAL_ENABLED=true for a "
            "temporary local one."
        )
    bound = (
        ephemeral.startup_timeout_seconds
        if "startup_timeout_seconds" in ephemeral.model_fields_set
        else DEFAULT_STARTUP_SECONDS
    )
    return _start_local_server(bound, str(settings.home), console)


def connect_or_exit(console: Console) -> str:
    """`connect()` for a CLI command: on failure print what to do and exit with status 1."""
    try:
        return connect(console)
    except PrefectUnavailable as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


def _start_local_server(bound: int, home: str, console: Console) -> str:
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    waiting = (
        f"Starting a local Prefect server (its database is in {home}; a first start creates "
        f"it), up to {bound} s..."
    )
    if not console.is_terminal:  # a spinner shows nothing in a log: say it once
        console.print(waiting, highlight=False)
    with console.status(waiting):
        try:
            server.start(timeout=bound)
        except (RuntimeError, httpx.HTTPError):
            process = server.server_process
            exited = process.poll() if process is not None else None
            server.stop()
            if exited is not None:
                raise PrefectUnavailable(
                    f"The local Prefect server exited with code {exited} while starting "
                    f"(its output is above; database in {home}). Fix what it says, or run "
                    "`prefect server start` yourself and set PREFECT_API_URL."
                ) from None
            raise PrefectUnavailable(
                f"The local Prefect server did not answer within {bound} s. On a slow or busy "
                f"machine raise the bound: {STARTUP_SETTING}=600 (an environment variable), "
                "or run `prefect server start` yourself and set PREFECT_API_URL."
            ) from None
    return server.api_url


def _wait_for_api(url: str, console: Console) -> str:
    deadline = time.monotonic() + API_WAIT_SECONDS
    problem = "no answer"
    with (
        console.status(f"Waiting for the Prefect API at {url}, up to {API_WAIT_SECONDS:.0f} s..."),
        httpx.Client(timeout=_HEALTH_REQUEST_TIMEOUT) as client,
    ):
        while time.monotonic() < deadline:
            try:
                response = client.get(f"{url.rstrip('/')}/health")
                if response.status_code == 200:
                    return url
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__
            time.sleep(_HEALTH_POLL_SECONDS)  # polling the health condition, bounded above
    raise PrefectUnavailable(
        f"The Prefect API at {url} did not answer within {API_WAIT_SECONDS:.0f} s ({problem}). "
        "Start it (`prefect server start`), point PREFECT_API_URL at a running server, or "
        "unset PREFECT_API_URL to use a temporary local one."
    )
