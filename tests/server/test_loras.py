"""LoRAs over HTTP on the tiny pair: the listings, A1111's prompt tags through txt2img, and refusals before
anything is queued (no file paths over HTTP)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from diffusers import StableDiffusionXLPipeline

from sdxl_refinery import ImageService
from sdxl_refinery.loras import LoraFolder

from ..engine.test_loras import UNET_TARGETS, _random_lora
from .conftest import ServerFactory


@pytest.fixture
def lora_service(service: ImageService, tiny_pair: tuple[Path, Path], tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> ImageService:  # fmt: skip
    """The session's tiny service reading a LoRA folder with `ink` (UNet LoRA) and a broken file."""
    folder = tmp_path / "loras"
    source = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=_random_lora(source.unet, UNET_TARGETS, 5),
                                                weight_name="ink.safetensors")  # fmt: skip
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setattr(service, "lora_folder", LoraFolder(folder))
    return service


def test_the_listings_name_usable_loras_and_say_why_others_are_not(
    lora_service: ImageService, real_server_factory: ServerFactory
) -> None:
    with real_server_factory() as server:
        native = server.client.get("/v1/loras").json()
        assert [row["name"] for row in native["loras"]] == ["ink"] and len(native["loras"][0]["hash"]) == 12
        assert native["loras"][0]["parts"] == ["unet"] and "not a readable" in native["unusable"]["broken"]
        a1111 = server.client.get("/sdapi/v1/loras").json()
        assert [(row["name"], row["alias"]) for row in a1111] == [("ink", "ink")]
        assert a1111[0]["path"].endswith("ink.safetensors") and isinstance(a1111[0]["metadata"], dict)
        assert server.client.post("/sdapi/v1/refresh-loras").status_code == 200


def test_a1111_prompt_tags_apply_the_lora_and_the_infotext_records_its_hash(
    lora_service: ImageService, real_server_factory: ServerFactory
) -> None:
    body = {"prompt": "a cat <lora:ink:0.8>", "steps": 4, "width": 64, "height": 64, "seed": 3}
    with real_server_factory() as server:
        answer = server.client.post("/sdapi/v1/txt2img", json=body)
        assert answer.status_code == 200, answer.text
        info = json.loads(answer.json()["info"])
        short = server.client.get("/v1/loras").json()["loras"][0]["hash"]
        assert f"Lora hashes: \"ink: {short}\"" in info["infotexts"][0] or f"Lora hashes: ink: {short}" in info[
            "infotexts"][0]  # fmt: skip
        assert info["infotexts"][0].startswith("a cat <lora:ink:0.8>")
        plain = server.client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a cat "}).json()["images"]
        assert plain != answer.json()["images"]  # the tag changed the image, and only the tag differs


@pytest.mark.parametrize(
    ("loras", "said"),
    [
        ([{"name": "nope"}], "loras[0] nope: no such LoRA (known: broken, ink)"),
        ([{"name": "broken"}], "loras[0] broken: not a readable safetensors file"),
        ([{"name": "/etc/ink.safetensors"}], "no such LoRA"),
        ([{"name": "ink", "weight": 7}], "less than or equal to 5"),
    ],
    ids=["unknown", "broken", "a-path", "weight"],
)
def test_bad_loras_are_a_422_naming_them_and_nothing_is_queued(
    lora_service: ImageService, real_server_factory: ServerFactory, loras: list[dict[str, object]], said: str
) -> None:
    with real_server_factory() as server:
        answer = server.client.post("/v1/jobs", json={"prompt": "a cat", "width": 64, "height": 64, "loras": loras})
        assert answer.status_code == 422 and said in answer.text and "loras" in answer.text
        assert server.client.get("/v1/jobs").json()["total"] == 0
