"""Scale-out with real components: redis-server, two `refinery worker` processes, a celery-backed API server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from sdxl_refinery import ImageService

from ..fakes import fake_service
from ..server.conftest import RunningServer, run_server
from ..waiting import patience, poll
from .redis_server import REDIS, redis_server

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")
VISIBILITY_TIMEOUT = 10  # seconds; real deployments use hours (longer than the longest job)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a loopback port, stopped at the end."""
    with redis_server(tmp_path_factory.mktemp("redis")) as (url, _process):
        yield url


class Workers:
    def __init__(self, redis_url: str, data_dir: Path, logs: Path, pair: tuple[str, str] = ("tiny", "tiny"),
                 **settings: str) -> None:  # fmt: skip
        self.redis_url, self.data_dir, self.logs, self.pair = redis_url, data_dir, logs, pair
        self.settings = {f"REFINERY_{name.upper()}": value for name, value in settings.items()}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *arguments: str) -> None:
        """Start `refinery worker --name NAME` (or, with `arguments`, `refinery worker ARGUMENTS`: `name` is then
        only this helper's handle on the process)."""
        environment = {**os.environ, "REFINERY_BASE_MODEL": self.pair[0], "REFINERY_REFINER_MODEL": self.pair[1],
                       "REFINERY_PRECISION": "full", "REFINERY_REDIS_URL": self.redis_url,
                       "REFINERY_DATA_DIR": str(self.data_dir), "REFINERY_PREVIEW_EVERY": "1",
                       "REFINERY_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT), "HF_HUB_OFFLINE": "1",
                       "OMP_NUM_THREADS": "1", **self.settings}  # fmt: skip  # two workers share two cores
        with (self.logs / f"{name}.log").open("ab") as sink:
            command = [sys.executable, "-m", "sdxl_refinery", "worker", *(arguments or ("--name", name))]
            self.processes[name] = subprocess.Popen(command,
                                                    env=environment, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=patience(30))
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="module")
def api_service() -> Iterator[ImageService]:
    """The API server's own service: with Celery it renders nothing (the workers do), so a fake serves."""
    service, _engine = fake_service()
    yield service
    service.close()


@pytest.fixture(scope="module")
def cluster(
    redis_url: str, api_service: ImageService, tmp_path_factory: pytest.TempPathFactory, tiny_pair: tuple[Path, Path]
) -> Iterator[tuple[RunningServer, Workers]]:
    """One API server and two worker processes (real tiny SDXL pairs, as folders, so that checkpoints of the
    models folder pair with their refiner) for the module (the SIGKILL test runs last)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    data = tmp_path / "shared"
    workers = Workers(redis_url, data, tmp_path, (str(tiny_pair[0]), str(tiny_pair[1])))
    workers.start("w1")
    workers.start("w2")
    try:
        with run_server(api_service, data, backend="celery", redis_url=redis_url) as server:
            poll(lambda: len(server.client.get("/v1/workers").json()["workers"]) >= 2, "both workers to report",
                 interval=0.2)  # fmt: skip
            yield server, workers
    finally:
        workers.stop_all()


def _submit(server: RunningServer, steps: int = 12, **fields: Any) -> str:
    body = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": steps, "refiner_steps": 3, **fields}
    answer = server.client.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def test_the_redis_store_attaches_retries_like_the_sqlite_store(redis_url: str, tmp_path: Path) -> None:
    """On a database of its own: its Celery tasks reach no worker of the cluster."""
    from sdxl_refinery.config import Settings
    from sdxl_refinery.jobs.celery_store import CeleryJobStore
    from sdxl_refinery.jobs.store import Dedup
    from sdxl_refinery.request import GenerationRequest

    store = CeleryJobStore(Settings(redis_url=redis_url.rsplit("/", 1)[0] + "/1", data_dir=tmp_path))
    request = GenerationRequest(prompt="x", width=256, height=256)
    retry = Dedup("fp-redis", window_seconds=3600, unanswered_only=True)
    job, attached = store.create_or_attach(request, "openai", None, retry)
    again, attached_again = store.create_or_attach(request, "openai", None, retry)
    assert (attached, attached_again, again.id) == (False, True, job.id)
    store.start(job.id, "w")
    store.succeed(job.id, {"images": [], "seeds": [], "metadata": {}})
    store.mark_answered(job.id)
    assert store.get(job.id).answered and store.get(job.id).status.value == "succeeded"
    fresh, attached = store.create_or_attach(request, "openai", None, retry)
    assert not attached and fresh.id != job.id
    assert store.create_or_attach(request, "openai", None, retry)[0].id == fresh.id  # the key now names the new job
    store.redis.flushdb()
    store.close()


def test_jobs_spread_across_both_workers(cluster: tuple[RunningServer, Workers]) -> None:
    server, _ = cluster
    ids = [_submit(server, seed=i) for i in range(6)]
    jobs = [server.wait_for(job_id, {"succeeded"}) for job_id in ids]
    assert {job["result"]["metadata"]["device"] for job in jobs} == {"cpu"}
    assert {server.client.get(f"/v1/jobs/{j}").json()["attempts"] for j in ids} == {1}
    workers_used = {server.client.get(f"/v1/jobs/{j}").json()["worker"] for j in ids}
    assert workers_used == {"w1", "w2"}
    status = server.client.get("/v1/workers").json()
    assert status["backend"] == "celery" and status["queue_depth"] == 0
    assert sorted(w["name"] for w in status["workers"]) == ["w1", "w2"]


def test_cancel_across_processes(cluster: tuple[RunningServer, Workers]) -> None:
    server, _ = cluster
    job_id = _submit(server, steps=500)
    poll(lambda: server.job(job_id)["progress"]["step"] >= 3, "the job to reach step 3")
    server.client.post(f"/v1/jobs/{job_id}/cancel")
    job = server.wait_for(job_id, {"cancelled"})
    assert job["progress"]["step"] < 500
    queued_behind = [_submit(server, steps=500) for _ in range(3)]
    cancelled = server.client.post(f"/v1/jobs/{queued_behind[-1]}/cancel").json()
    assert cancelled["status"] == "cancelled"  # a queued job is cancelled at once, its task will skip it
    for other in queued_behind[:-1]:
        server.client.post(f"/v1/jobs/{other}/cancel")
    for other in queued_behind:
        server.wait_for(other, {"cancelled"})


def test_a1111_interrupt_across_processes_keeps_the_image(cluster: tuple[RunningServer, Workers]) -> None:
    server, _ = cluster
    job_id = _submit(server, steps=500)
    poll(lambda: server.job(job_id)["progress"]["step"] >= 3, "the job to reach step 3")
    assert server.client.post("/sdapi/v1/interrupt").json() == {"interrupted": job_id}
    job = server.wait_for(job_id, {"succeeded"})
    metadata = job["result"]["metadata"]
    assert metadata["interrupted"] is True and 3 <= metadata["base_steps"] < 500 and metadata["refined"] is False
    image = server.client.get(f"/v1/images/{job_id}/{job['result']['images'][0]}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"


def test_sse_progress_and_previews_travel_through_redis(cluster: tuple[RunningServer, Workers]) -> None:
    server, _ = cluster
    job_id = _submit(server, steps=12)
    seen: list[str] = []
    with server.client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                seen.append(line.split(":", 1)[1].strip())
                if seen[-1] == "done":
                    break
    assert {"progress", "preview", "done"} <= set(seen)


def test_openai_client_and_api_restart(cluster: tuple[RunningServer, Workers], api_service: ImageService) -> None:
    server, workers = cluster
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt="a bridge", size="256x256", n=2)
    assert len(answer.data) == 2 and all(item.b64_json for item in answer.data)
    before = server.client.get("/v1/jobs").json()
    with run_server(api_service, workers.data_dir, backend="celery", redis_url=workers.redis_url) as second:
        after = second.client.get("/v1/jobs").json()  # another API server (or a restarted one) sees everything
        assert after["total"] == before["total"] and after["items"][0]["id"] == before["items"][0]["id"]
        image = after["items"][0]["result"]["urls"][0].replace(server.url, second.url)
        assert second.client.get(image).status_code == 200


def test_sigkill_worker_mid_job_redelivers_to_the_other(cluster: tuple[RunningServer, Workers]) -> None:
    server, workers = cluster
    job_id = _submit(server, steps=60, n=2, seed=7)
    job = poll(lambda: (j := server.job(job_id))["progress"]["step"] >= 5 and j, "the job to reach step 5")
    victim = job["worker"]
    workers.processes[victim].send_signal(signal.SIGKILL)
    workers.processes[victim].wait(timeout=patience(10))
    done = server.wait_for(job_id, {"succeeded"})
    survivor = server.client.get(f"/v1/jobs/{job_id}").json()
    assert survivor["worker"] != victim and done["attempts"] == 2
    folder = workers.data_dir / "images" / job_id
    assert sorted(path.name for path in folder.iterdir()) == ["image.attempt2-1.png", "image.attempt2-2.png"]
    assert sorted(done["result"]["images"]) == ["image.attempt2-1.png", "image.attempt2-2.png"]


def test_an_inpainting_job_travels_through_redis_with_its_images(cluster: tuple[RunningServer, Workers]) -> None:
    """The queue payload carries the init image and mask themselves, so a worker on another machine needs no
    shared input folder; the record keeps only their hashes."""
    import base64
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    server, _ = cluster
    init = Image.new("RGB", (64, 64), (20, 140, 90))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)

    def encoded(image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    job_id = _submit(server, steps=4, width=64, height=64, init_image=encoded(init), mask_image=encoded(mask),
                     mask_blur=0)  # fmt: skip
    job = server.wait_for(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job.get("error")
    assert set(job["request"]["mask_image"]) == {"sha256", "width", "height"}
    name = job["result"]["images"][0]
    made = Image.open(io.BytesIO(server.client.get(f"/v1/images/{job_id}/{name}").content)).convert("RGB")
    assert np.array_equal(np.asarray(made)[:, 32:], np.asarray(init)[:, 32:])


async def test_workers_resolve_checkpoint_names_from_the_shared_models_folder(
    cluster: tuple[RunningServer, Workers], api_service: ImageService, tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """Workers find `base_model` names in the same folder layout (`<data-dir>/models`), and the job records
    which checkpoint made the image; its pixels are that model's, as a local service renders them."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from sdxl_refinery import GenerationRequest
    from sdxl_refinery.engine.catalog import ModelFolder

    from ..engine.test_model_choice import models_folder

    server, workers = cluster
    built = models_folder(tiny_pair, tmp_path)
    shared = workers.data_dir / "models"
    shared.mkdir(exist_ok=True)
    shutil.copy(built["folder"] / "beta.safetensors", shared / "beta.safetensors")
    api_service.models_folder = ModelFolder(shared)  # the API server checks names against the same folder
    fields = {"prompt": "a windmill", "width": 64, "height": 64, "num_inference_steps": 4, "refiner_steps": 2,
              "seed": 3}  # fmt: skip
    job_id = _submit(server, **fields, base_model="beta")
    job = server.wait_for(job_id, {"succeeded", "failed"})
    assert job["status"] == "succeeded", job.get("error")
    models = job["result"]["metadata"]["models"]
    assert models["base"] == "beta" and models["base_hash"] == ModelFolder(shared).find("beta").hash  # type: ignore[union-attr]
    name = job["result"]["images"][0]
    made = np.asarray(Image.open(io.BytesIO(server.client.get(f"/v1/images/{job_id}/{name}").content)), dtype=float)
    local = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", precision="full", models_dir=shared)
    try:
        expected = (await local.generate(GenerationRequest(**fields, base_model="beta"))).images[0]
    finally:
        local.close()
    assert np.abs(made - np.asarray(expected, dtype=float)).max() <= 2.0
    assert server.client.post("/v1/jobs", json={**fields, "base_model": "zeta"}).status_code == 422
