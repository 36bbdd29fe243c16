"""Every model and LoRA route stays 200 beside bad files in the folders (issue 31, item 1), on a real server."""

from __future__ import annotations

from pathlib import Path

from sdxl_refinery import ImageService
from sdxl_refinery.engine.catalog import ModelFolder
from sdxl_refinery.loras import LoraFolder

from ..fakes import FakeEngine
from ..test_hostile_folders import plant_hostile_files
from .conftest import ServerFactory


def test_every_model_and_lora_route_stays_200_beside_bad_files(
    server_factory: ServerFactory, fake: tuple[ImageService, FakeEngine], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    models = plant_hostile_files(data / "models")
    loras = plant_hostile_files(data / "loras") - {"bad-index", "list-index", "bad-config"}
    service = fake[0]
    service.models_folder, service.lora_folder = ModelFolder(data / "models"), LoraFolder(data / "loras")
    with server_factory() as server:
        for route in ("/v1/checkpoints", "/v1/models", "/sdapi/v1/sd-models", "/sdapi/v1/options", "/v1/loras",
                      "/sdapi/v1/loras"):  # fmt: skip
            assert server.client.get(route).status_code == 200, route
        listed = server.client.get("/v1/checkpoints").json()
        assert {item["name"] for item in listed["unusable"]} == models
        assert set(server.client.get("/v1/loras").json()["unusable"]) == loras
        named = server.client.post("/v1/jobs", json={"prompt": "x", "base_model": "json-bomb"})
        assert named.status_code == 422 and "base_model" in named.text
        fine = server.client.post("/v1/jobs", json={"prompt": "x", "width": 64, "height": 64,
                                                    "num_inference_steps": 2, "refiner_steps": 1})  # fmt: skip
        assert fine.status_code == 202
