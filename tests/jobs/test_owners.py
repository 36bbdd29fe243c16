"""Jobs belong to the key that submitted them (issue 31, item 7), in both stores: listings by owner, and each
owner's share of the queue counted from its own queued and running jobs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxl_refinery.config import Settings
from sdxl_refinery.jobs.models import JobStatus
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore
from sdxl_refinery.jobs.store import JobStore, Owner, QueueFull
from sdxl_refinery.request import GenerationRequest

from .redis_server import REDIS, redis_server


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
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


def test_each_owner_lists_its_own_and_holds_its_share(store: JobStore) -> None:
    request = GenerationRequest(prompt="x", width=256, height=256)
    alice, bob = Owner("alice", share=2), Owner("bob", share=2)
    first = store.create(request, "native", 10, alice)
    store.create(request, "native", 10, alice)
    with pytest.raises(QueueFull, match="key 'alice' has its share of the queue"):
        store.create(request, "native", 10, alice)
    bobs = store.create(request, "native", 10, bob)
    assert store.get(first.id).owner == "alice"
    jobs, total = store.list(0, 10, owner="alice")
    assert total == 2 and {job.owner for job in jobs} == {"alice"}
    assert store.list(0, 10, owner="bob")[0][0].id == bobs.id
    assert store.list(0, 10)[1] == 3  # no owner: every job
    assert store.start(first.id, "w") is not None  # running still counts against the share
    with pytest.raises(QueueFull):
        store.create(request, "native", 10, alice)
    store.succeed(first.id, {"images": [], "seeds": [], "metadata": {}})
    store.create(request, "native", 10, alice)  # a finished job frees its place
    assert store.list(0, 10, JobStatus.SUCCEEDED, owner="alice")[1] == 1
    assert store.list(0, 10, JobStatus.SUCCEEDED, owner="bob")[1] == 0
