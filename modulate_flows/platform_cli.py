"""`modulate-flows platform ...`: commands for the Modulate Platform API.

`realtime` creates a realtime_websocket job and prints its URL with the token masked, so the
command's output can be pasted into a ticket or a log without leaking a credential.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.markup import escape

from modulate_flows.console import make_console
from modulate_flows.prefect_api import connect_or_exit

__all__ = ["platform_app"]

platform_app = typer.Typer(help="The Modulate Platform API.", no_args_is_help=True)
console = make_console()


@platform_app.command("realtime")
def realtime(
    block: Annotated[
        str, typer.Option(help="Name of the Modulate Platform Credentials block.")
    ] = "modulate",
    emotion: Annotated[bool, typer.Option(help="Emotion annotation.")] = False,
    demographics: Annotated[bool, typer.Option(help="Demographics.")] = False,
    synthetic_voice: Annotated[bool, typer.Option(help="Synthetic voice detection.")] = False,
    behavioural_insights: Annotated[bool, typer.Option(help="Behavioural insights.")] = False,
) -> None:
    """Create a realtime Platform job and print its job id and (redacted) realtime URL."""
    connect_or_exit(console)
    # Imported here, after the environment is set: Prefect reads its settings at import.
    from blocks import PlatformCredentials
    from blocks.loading import BlockNotLoaded, load_block
    from modulate import PlatformFlags, redact_url
    from tasks.platform import create_realtime_session

    flags = PlatformFlags(
        emotion_annotation=emotion,
        demographics=demographics,
        synthetic_voice_detection=synthetic_voice,
        behavioral_insights=behavioural_insights,
    )

    async def create() -> tuple[str, str]:
        credentials = await load_block(PlatformCredentials, block)
        async with credentials.platform_client() as client:
            session = await create_realtime_session(client, flags)
        return session.job_id, session.realtime_url

    try:
        job_id, url = asyncio.run(create())
    except BlockNotLoaded as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False)
        raise typer.Exit(2) from None
    console.print(f"job_id: {job_id}")
    console.print(f"realtime_url: {redact_url(url)}", soft_wrap=True)
