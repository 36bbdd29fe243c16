"""`refinery serve` as users run it: its own process, on a loopback port, over the tiny pair."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from ..waiting import poll


def start_server(data: Path, port: int, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """Start `refinery serve`; `settings` become `REFINERY_<NAME>` variables. Output goes to `log`."""
    environment = {**os.environ, "REFINERY_BASE_MODEL": "tiny", "REFINERY_REFINER_MODEL": "tiny",
                   "REFINERY_PRECISION": "full", "REFINERY_MAX_STEPS": "500", "HF_HUB_OFFLINE": "1",
                   **{f"REFINERY_{name.upper()}": value for name, value in settings.items()}}  # fmt: skip
    with log.open("ab") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "sdxl_refinery", "serve", "--port", str(port), "--data-dir", str(data)],
            env=environment, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip


def wait_ready(url: str, process: subprocess.Popen[bytes], headers: dict[str, str] | None = None) -> None:
    """Return once `/ready` is 200 (models loaded). Raises AssertionError if the process exits first."""

    def ready() -> bool:
        assert process.poll() is None, "server exited"
        try:
            return httpx.get(url + "/ready", headers=headers).status_code == 200
        except httpx.TransportError:
            return False

    poll(ready, "the server to be ready", interval=0.2)
