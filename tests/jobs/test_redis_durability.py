"""Redis without surprises (issue 27, item 2): the settings that would lose jobs are named, and with the
append-only file on, a Redis killed and restarted loses no queued job (real redis-server, real worker)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from sdxl_refinery.config import Settings

from ..fakes import fake_service
from ..server.conftest import free_port, run_server
from ..waiting import patience, poll
from .redis_server import REDIS, redis_server, start_redis, wait_for_redis
from .test_celery import Workers

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")
AOF = ("--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction")  # docs/scale-out.md


@pytest.mark.parametrize(
    ("options", "warned"),
    [((), ["append-only"]), (AOF, []), ((*AOF[:4], "--maxmemory-policy", "allkeys-lru"), ["allkeys-lru"])],
)
def test_redis_settings_that_would_lose_jobs_are_named(tmp_path: Path, options: tuple[str, ...],
                                                       warned: list[str]) -> None:  # fmt: skip
    from sdxl_refinery.jobs.celery_store import CeleryJobStore

    with redis_server(tmp_path, *options) as (url, _process):
        store = CeleryJobStore(Settings(redis_url=url, data_dir=tmp_path))
        warnings = store.durability_warnings()
        store.close()
    assert len(warnings) == len(warned) and all(w in text for w, text in zip(warned, warnings, strict=True))


def test_queued_jobs_survive_a_redis_crash_with_the_append_only_file(
    tmp_path: Path, tiny_pair: tuple[Path, Path]
) -> None:
    folder, port = tmp_path / "redis", free_port()
    folder.mkdir()
    url = f"redis://127.0.0.1:{port}/0"
    redis = start_redis(folder, port, *AOF)
    wait_for_redis(port)
    service, _engine = fake_service()
    workers = Workers(url, tmp_path / "shared", tmp_path, (str(tiny_pair[0]), str(tiny_pair[1])))
    try:
        with run_server(service, tmp_path / "shared", backend="celery", redis_url=url) as server:
            body = {"prompt": "x", "width": 128, "height": 128, "num_inference_steps": 4, "refiner_steps": 2}
            jobs = [server.client.post("/v1/jobs", json={**body, "seed": i}).json()["id"] for i in range(3)]
            time.sleep(1.5)  # appendfsync everysec: what a crash may lose is the last second's writes
            redis.send_signal(signal.SIGKILL)  # no shutdown save: only the append-only file survives
            redis.wait(timeout=patience(10))
            redis = start_redis(folder, port, *AOF)
            wait_for_redis(port)
            workers.start("after")  # the first worker ever: every job must come from the restored Redis
            for job_id in jobs:
                assert server.wait_for(job_id, {"succeeded", "failed"})["status"] == "succeeded"
            ready = poll(lambda: (r := server.client.get("/ready")).status_code == 200 and r.json(), "ready")
            assert ready["warnings"] == []
        assert "append-only" not in (tmp_path / "after.log").read_text()
    finally:
        workers.stop_all()
        service.close()
        redis.terminate()
        redis.wait(timeout=patience(10))
