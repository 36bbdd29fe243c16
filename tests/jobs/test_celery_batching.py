"""Celery workers batch too: two `refinery worker` processes over a real redis-server take compatible jobs
from the shared queue records into their passes, and every job runs once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_refinery import GenerationRequest, ImageService

from ..fakes import fake_service
from ..server.conftest import run_server
from ..waiting import poll
from .redis_server import REDIS, redis_server
from .test_celery import Workers

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")
BODY = {"width": 128, "height": 128, "num_inference_steps": 6, "refiner_steps": 3}


def test_two_celery_workers_batch_compatible_jobs_and_lose_nothing(
    tmp_path: Path, tiny_pair: tuple[Path, Path], service: ImageService
) -> None:
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as (url, _process):
        data = tmp_path / "shared"
        workers = Workers(url, data, tmp_path, (str(tiny_pair[0]), str(tiny_pair[1])), max_batch="4",
                          batch_window_ms="1500")  # fmt: skip
        workers.start("w1")
        workers.start("w2")
        api, _engine = fake_service()
        try:
            with run_server(api, data, backend="celery", redis_url=url) as server:
                poll(lambda: len(server.client.get("/v1/workers").json()["workers"]) >= 2, "both workers",
                     interval=0.2)  # fmt: skip
                bodies = [{**BODY, "prompt": f"celery job {index}", "seed": 50 + index} for index in range(6)]
                jobs = [server.client.post("/v1/jobs", json=body).json()["id"] for body in bodies]
                done = [server.wait_for(job_id, {"succeeded", "failed", "cancelled"}) for job_id in jobs]
        finally:
            workers.stop_all()
            api.close()
    assert [job["status"] for job in done] == ["succeeded"] * 6
    assert [job["attempts"] for job in done] == [1] * 6  # none ran twice, though each job's own task was delivered
    batched = [job for job in done if job["batch"] is not None]
    assert batched and all(2 <= job["batch"]["jobs"] <= 4 for job in batched)
    # A job of a batch has the image it gets alone.
    for job, body in list(zip(done, bodies, strict=True))[:2]:
        alone = asyncio_run(service, GenerationRequest(**body))
        mine = Image.open(data / "images" / job["id"] / job["result"]["images"][0]).convert("RGB")
        assert np.abs(np.asarray(mine, dtype=np.int16) - np.asarray(alone, dtype=np.int16)).max() <= 2


def asyncio_run(service: ImageService, request: GenerationRequest) -> Image.Image:
    import asyncio

    return asyncio.run(service.generate(request)).images[0]
