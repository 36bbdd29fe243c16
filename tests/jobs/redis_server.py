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


def start_redis(folder: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    """redis-server on `port` keeping its files in `folder`; `options` after the defaults (no persistence)."""
    command = [str(REDIS), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(folder), *options]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def wait_for_redis(port: int) -> None:
    """Return once the redis-server on `port` answers PING."""
    import redis

    client = redis.Redis(port=port, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    poll(answers, "redis-server to start")


@contextmanager
def redis_server(folder: Path, *options: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """redis-server on a loopback port (no persistence unless `options` say so), its URL and process; stopped
    at the end, thawed first if a test froze it."""
    port = free_port()
    process = start_redis(folder, port, *options)

    try:
        wait_for_redis(port)
        yield f"redis://127.0.0.1:{port}/0", process
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(timeout=patience(10))
