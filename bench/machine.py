"""What a benchmark records of the machine it ran on, and how it hands its figures over."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU's model name as `lscpu` gives it, else what the platform says."""
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def report(result: dict[str, Any], path: Path | None) -> None:
    """Print a benchmark's figures as JSON, and write them to `path` when given."""
    print(json.dumps(result, indent=2))
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
