"""`python -m modulate_flows` is the `modulate-flows` command."""

from modulate_flows.cli import app

app()
