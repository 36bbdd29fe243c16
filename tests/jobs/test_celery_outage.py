"""A Redis outage under a Celery deployment: real redis-server, a real worker process, a real API server.

Redis is frozen with SIGSTOP (what a hung server or a half-open connection looks like: nothing refuses,
nothing answers) while a job runs, then thawed with SIGCONT.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sdxl_refinery import ImageService

from ..fakes import fake_service
from ..server.conftest import RunningServer, run_server
from ..waiting import patience, poll
from .redis_server import REDIS, redis_server
from .test_celery import Workers

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")


@pytest.fixture(name="redis_server")
def frozen_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own (it is frozen and thawed), stopped at the end."""
    with redis_server(tmp_path) as running:
        yield running


@pytest.fixture
def api_service() -> Iterator[ImageService]:
    service, _engine = fake_service()  # the API server renders nothing with Celery: the worker does
    yield service
    service.close()


def _submit(server: RunningServer, steps: int) -> httpx.Response:
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": steps, "refiner_steps": 3}
    return server.client.post("/v1/jobs", json=body, timeout=patience(30))


def test_a_redis_outage_pauses_everything_and_it_all_recovers(
    redis_server: tuple[str, subprocess.Popen[bytes]], api_service: ImageService, tmp_path: Path
) -> None:
    url, redis_process = redis_server
    workers = Workers(url, tmp_path / "shared", tmp_path)
    workers.start("w1")
    try:
        with run_server(api_service, tmp_path / "shared", backend="celery", redis_url=url) as server:
            poll(lambda: server.client.get("/ready").status_code == 200, "the worker to report", interval=0.2)
            accepted = _submit(server, steps=400)
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["id"]
            poll(lambda: server.job(job_id)["progress"]["step"] >= 3, "the job to reach step 3", interval=0.1)

            # 1. Redis hangs: readiness and submissions say so with a reason, nothing is a bare 500.
            redis_process.send_signal(signal.SIGSTOP)
            ready = server.client.get("/ready", timeout=patience(30))
            assert ready.status_code == 503 and "Redis" in ready.json()["error"], ready.text
            refused = _submit(server, steps=10)
            assert refused.status_code == 503 and "Redis" in refused.json()["detail"], refused.text
            assert refused.headers["retry-after"]
            time.sleep(4)  # the worker meets the outage too (progress writes, flag checks, events)

            # 2. Redis is back: the running job finishes, readiness returns, the next job runs.
            redis_process.send_signal(signal.SIGCONT)
            poll(lambda: server.job(job_id)["status"] == "succeeded", "the job to finish after the outage",
                 interval=0.2)  # fmt: skip
            poll(lambda: server.client.get("/ready").status_code == 200, "readiness to return", interval=0.2)
            after = _submit(server, steps=5)
            assert after.status_code == 202, after.text
            poll(lambda: server.job(after.json()["id"])["status"] == "succeeded", "the next job", interval=0.2)
            finished = server.job(job_id)
            assert finished["attempts"] == 1 and finished["result"]["metadata"]["base_steps"] == 400
    finally:
        workers.stop_all()
    log = (tmp_path / "w1.log").read_text()
    assert "Job store unavailable" in log or "not reaching Redis" in log  # the worker saw it, and said so


def test_a_full_redis_is_insufficient_storage_and_nothing_is_half_created(
    redis_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Redis at its maxmemory with no eviction refuses writes with OOM: a 507-class fault, no job left behind."""
    import redis

    from sdxl_refinery.config import Settings
    from sdxl_refinery.errors import StoreUnavailable
    from sdxl_refinery.jobs.celery_store import CeleryJobStore
    from sdxl_refinery.request import GenerationRequest

    url, _process = redis_server
    admin = redis.Redis.from_url(url)
    store = CeleryJobStore(Settings(redis_url=url, data_dir=tmp_path))
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)  # below what is already used: every write is refused
    with pytest.raises(StoreUnavailable) as caught:
        store.create(GenerationRequest(prompt="x", width=256, height=256), client="test")
    assert caught.value.disk_full and "maxmemory" in str(caught.value)
    admin.config_set("maxmemory", 0)
    assert store.counts()["queued"] == 0 and store.list()[1] == 0
    assert store.create(GenerationRequest(prompt="x", width=256, height=256), client="test").status.value == "queued"
