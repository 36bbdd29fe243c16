"""The Redis store takes back the jobs of silent workers, fenced on the dead attempt (issue 27, item 1)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxl_refinery.config import Settings
from sdxl_refinery.jobs.models import JobProgress, JobStatus
from sdxl_refinery.jobs.store import JobLost
from sdxl_refinery.request import GenerationRequest

from .redis_server import REDIS, redis_server

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[tuple[object, object]]:
    """Two stores on one Redis, as two worker processes have (no broker: the subject is the store)."""
    from sdxl_refinery.jobs.celery_store import CeleryJobStore

    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as (url, _process):
        pair = [CeleryJobStore(Settings(redis_url=url, data_dir=tmp_path)) for _ in range(2)]
        sent: list[str] = []
        for store in pair:
            store._send = sent.append  # type: ignore[method-assign]
        yield pair[0], pair[1]
        for store in pair:
            store.close()


def test_a_silent_workers_job_is_queued_again_once_and_its_writes_are_fenced(stores: tuple) -> None:  # type: ignore[type-arg]
    dead, alive = stores
    job = dead.create(GenerationRequest(prompt="x", width=256, height=256), "native")
    assert dead.start(job.id, "w-dead").attempts == 1
    assert dead.reap(60.0, crash_limit=3) == []  # just started: not silent long enough yet
    time.sleep(0.05)
    assert alive.reap(0.01, crash_limit=3) == [job.id]  # w-dead never beat: taken back
    assert alive.reap(0.01, crash_limit=3) == []  # once
    assert alive.get(job.id).status is JobStatus.QUEUED and alive.get(job.id).worker is None
    with pytest.raises(JobLost):
        dead.update_progress(job.id, JobProgress(1, 5, 10, 50.0))  # the dead attempt comes back: refused
    again = alive.start(job.id, "w-alive")
    assert again is not None and again.attempts == 2
    for write in (lambda: dead.succeed(job.id, {"images": ["image.png"], "seeds": [], "metadata": {}}),
                  lambda: dead.fail(job.id, "late"), lambda: dead.mark_cancelled(job.id)):  # fmt: skip
        with pytest.raises(JobLost):
            write()
    alive.succeed(job.id, {"images": ["image.attempt2.png"], "seeds": [], "metadata": {}})
    done = alive.get(job.id)
    assert (done.status, done.worker, done.result["images"]) == (  # type: ignore[index]
        JobStatus.SUCCEEDED, "w-alive", ["image.attempt2.png"])  # fmt: skip


def test_the_crash_limit_counts_deaths_found_by_silence(stores: tuple) -> None:  # type: ignore[type-arg]
    first, second = stores
    job = first.create(GenerationRequest(prompt="x", width=256, height=256), "native")
    first.start(job.id, "w1")
    time.sleep(0.05)
    assert second.reap(0.01, crash_limit=2) == [job.id]
    second.start(job.id, "w2")
    time.sleep(0.05)
    assert first.reap(0.01, crash_limit=2) == [job.id]
    failed = first.get(job.id)
    assert failed.status is JobStatus.FAILED and "its worker died 2 times" in (failed.error or "")
