"""A throwaway PostgreSQL cluster on 127.0.0.1, for the Prefect server of bench/workers.py.

Debian's `postgresql` package, installed by `apt-get` when missing (the bench's own
set-up step). The cluster lives in a temporary directory, listens on a free port of
127.0.0.1 only, and is stopped and deleted at the end. PostgreSQL refuses to run as root,
so as root the cluster belongs to the package's `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ensure_installed", "temporary_cluster"]

BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_S = 60
COMMAND_TIMEOUT_S = 600  # apt-get install on a slow mirror
DATABASE = "prefect"
SUPERUSER = "postgres"


def ensure_installed() -> Path:
    """The directory of `initdb` and `pg_ctl`; installs Debian's postgresql if missing."""
    found = _bin_dir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("PostgreSQL is not installed: run `apt-get install -y postgresql`")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        subprocess.run(command, check=True, capture_output=True, timeout=COMMAND_TIMEOUT_S,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    found = _bin_dir()
    if found is None:
        raise RuntimeError(f"apt-get installed postgresql but no initdb under {BIN_GLOB}")
    return found


@contextlib.contextmanager
def temporary_cluster() -> Iterator[str]:
    """Start a cluster with an empty database; yield its SQLAlchemy asyncpg URL."""
    bin_dir = ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="modulate-bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, SUPERUSER, SUPERUSER)
        as_user = ["runuser", "-u", SUPERUSER, "--"]
    data, log = root / "data", root / "server.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True,
                       timeout=START_TIMEOUT_S, cwd=root)

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust",
            "-E", "UTF8")
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
            "-t", str(START_TIMEOUT_S), "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start")
        try:
            run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                "-U", SUPERUSER, DATABASE)
            yield f"postgresql+asyncpg://{SUPERUSER}@127.0.0.1:{port}/{DATABASE}"
        finally:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _bin_dir() -> Path | None:
    found = sorted(glob.glob(f"{BIN_GLOB}/initdb"))
    return Path(found[-1]).parent if found else None
