"""Checkpoints chosen per request on every face of a real server: native fields, A1111's override_settings and
stored options, OpenAI's `model`; listed by sd-models and /v1/models; unknown names refused before queueing."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import requests
from PIL import Image

from sdxl_refinery import GenerationRequest, ImageService

from ..engine.test_model_choice import models_folder
from .conftest import RunningServer, run_server

FIELDS: dict[str, Any] = {"prompt": "a red barn", "width": 64, "height": 64, "seed": 12}
A1111: dict[str, Any] = {"prompt": "a red barn", "width": 64, "height": 64, "seed": 12}


@pytest.fixture(scope="module")
def chosen(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, ...]]:
    root = tmp_path_factory.mktemp("faces")
    models = models_folder(tiny_pair, root)
    service = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", precision="full",
                           models_dir=models["folder"], max_loaded_pairs=2)  # fmt: skip
    with run_server(service, root / "data") as server:
        yield server, service
    service.close()


async def reference(service: ImageService, **fields: Any) -> np.ndarray:
    """The library's image for these fields: what every face must give back."""
    result = await service.generate(GenerationRequest(**FIELDS, **fields))
    return np.asarray(result.images[0])


def job_image(server: RunningServer, job: dict[str, Any]) -> np.ndarray:
    name = job["result"]["images"][0]
    return np.asarray(Image.open(io.BytesIO(server.client.get(f"/v1/images/{job['id']}/{name}").content)))


def a1111_image(answer: requests.Response) -> np.ndarray:
    import base64

    assert answer.status_code == 200, answer.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))))


async def test_every_face_picks_the_checkpoint(chosen: tuple[RunningServer, ImageService]) -> None:
    server, service = chosen
    beta, gamma, own = [await reference(service, base_model=name) for name in ("beta", "gamma", None)]
    assert np.abs(beta.astype(int) - own).mean() > 5 and np.abs(gamma.astype(int) - own).mean() > 5

    # Native: the field, by name; the job records which checkpoint made the image.
    answer = server.client.post("/v1/jobs", json={**FIELDS, "base_model": "beta"})
    job = server.wait_for(answer.json()["id"], {"succeeded", "failed"})
    assert np.array_equal(job_image(server, job), beta)
    assert job["result"]["metadata"]["models"]["base"] == "beta"

    # A1111: the titles sd-models lists, in override_settings; then a stored default; then the server's own.
    titles = {row["model_name"]: row["title"] for row in server.client.get("/sdapi/v1/sd-models").json()}
    assert titles["gamma"].startswith("gamma [") and "refiner-x" in titles
    body = {**A1111, "override_settings": {"sd_model_checkpoint": titles["gamma"]}}
    assert np.array_equal(a1111_image(server.client.post("/sdapi/v1/txt2img", json=body)), gamma)
    assert server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}).status_code == 200
    assert server.client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == titles["beta"]
    assert np.array_equal(a1111_image(server.client.post("/sdapi/v1/txt2img", json=A1111)), beta)
    own_title = next(title for name, title in titles.items() if name not in ("beta", "gamma", "refiner-x"))
    assert server.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": own_title}).status_code == 200
    assert np.array_equal(a1111_image(server.client.post("/sdapi/v1/txt2img", json=A1111)), own)
    assert len(service.loaded_pairs) <= 2

    # OpenAI: `model` by name (no seed in OpenAI's API: the job says which checkpoint made it).
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert "gamma" in [model.id for model in client.models.list().data]
    made = client.images.generate(prompt="a red barn", model="gamma", size="64x64", n=1)
    assert Image.open(io.BytesIO(__import__("base64").b64decode(made.data[0].b64_json or ""))).size == (64, 64)
    newest = server.client.get("/v1/jobs?limit=1").json()["items"][0]["id"]
    assert server.client.get(f"/v1/jobs/{newest}").json()["result"]["metadata"]["models"]["base"] == "gamma"


def test_unknown_checkpoints_are_refused_on_every_face(chosen: tuple[RunningServer, ImageService]) -> None:
    server, _ = chosen
    answer = server.client.post("/v1/jobs", json={**FIELDS, "base_model": "../models/beta"})
    assert answer.status_code == 422 and "base_model" in answer.text and "known: beta, gamma" in answer.text
    body = {**A1111, "override_settings": {"sd_model_checkpoint": "delta [0123456789]"}}
    answer = server.client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 404 and answer.json()["error"] == "CheckpointNotFound"
    answer = server.client.post("/sdapi/v1/txt2img", json={**A1111, "refiner_checkpoint": "beta"})
    assert answer.status_code == 422 and "refiner_checkpoint" in answer.text and "base checkpoint" in answer.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", model="delta", size="64x64")
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert client.images.generate(prompt="x", model="dall-e-3", size="64x64").data  # OpenAI's ids: the own pair
    assert server.client.get("/v1/jobs?status=queued").json()["total"] == 0
