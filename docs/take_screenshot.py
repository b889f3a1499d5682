"""Take docs/run-form.png: the "Custom run" form of the nightly deployment in the Prefect UI.

Not part of the test suite. It starts a throwaway `prefect server start` (temporary
PREFECT_HOME, 127.0.0.1 only), applies the nightly deployment of deployments/prefect.yaml
and photographs the form with headless Chromium (Debian: `apt-get install chromium`).

    uv run python docs/take_screenshot.py [--out docs/run-form.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere; the helper lives in tests/

from tests.prefect_server import (  # noqa: E402
    POOL,
    PREFECT_FILE,
    prefect_cli,
    running_server,
)

# The UI is a single-page app: the virtual-time budget lets it fetch the deployment and
# render the form before the shot; the other flags keep Chromium off the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1400,2700",
    "--virtual-time-budget=30000",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "run-form.png")
    parser.add_argument("--deployment", default="nightly")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Chromium not found: apt-get install chromium")

    with tempfile.TemporaryDirectory() as home, running_server(Path(home)) as env:
        api = env["PREFECT_API_URL"]
        prefect_cli(env, "work-pool", "create", POOL, "--type", "process")
        prefect_cli(
            env,
            *("--no-prompt", "deploy", "--name", args.deployment),
            *("--prefect-file", str(PREFECT_FILE)),
        )
        response = httpx.post(f"{api}/deployments/filter", json={})
        response.raise_for_status()
        (deployment,) = [d for d in response.json() if d["name"] == args.deployment]
        url = f"{api.removesuffix('/api')}/deployments/deployment/{deployment['id']}/run"
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [
                    chromium,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    f"--screenshot={args.out.resolve()}",
                    url,
                ],
                check=True,
                capture_output=True,
                timeout=180,
            )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
