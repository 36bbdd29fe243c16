"""A real redis-server for the scale-out tests (Debian's package; the tests skip without it)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..server.conftest import free_port
from ..waiting import patience, poll

REDIS = shutil.which("redis-server")


@contextmanager
def redis_server(folder: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """redis-server on a loopback port (no persistence), its URL and process; stopped at the end, thawed
    first if a test froze it."""
    import redis

    port = free_port()
    process = subprocess.Popen([str(REDIS), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        poll(answers, "redis-server to start")
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=patience(10))
