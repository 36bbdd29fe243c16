"""Fixtures shared by the queue tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxl_refinery.config import Settings
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore
from sdxl_refinery.jobs.store import JobStore

from .redis_server import REDIS, redis_server


@pytest.fixture(params=["sqlite", "redis"])
def each_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    """Each JobStore in turn: the embedded SQLite one, and the Celery backend's over a real redis-server (its
    broker left out: the subject is the store)."""
    if request.param == "sqlite":
        sqlite = SQLiteJobStore(tmp_path / "jobs.sqlite3")
        yield sqlite
        sqlite.close()
        return
    if REDIS is None:
        pytest.skip("Debian's redis-server is not installed")
    from sdxl_refinery.jobs.celery_store import CeleryJobStore

    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as (url, _process):
        redis_store = CeleryJobStore(Settings(redis_url=url, data_dir=tmp_path))
        redis_store._send = lambda job_id: None  # type: ignore[method-assign]  # no broker: the subject is the store
        yield redis_store
        redis_store.close()
