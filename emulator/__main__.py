"""`python -m emulator --port N --config FILE`: serve the emulator until interrupted."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from emulator.config import EmulatorConfig
from emulator.server import serve

__all__ = ["main"]

DEFAULT_PORT = 8000


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and serve in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m emulator", description=__doc__)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port on 127.0.0.1")
    parser.add_argument("--config", help="JSON (or YAML) EmulatorConfig file; default: demo org")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    config = EmulatorConfig.load(args.config) if args.config else EmulatorConfig.default()
    serve(config, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
