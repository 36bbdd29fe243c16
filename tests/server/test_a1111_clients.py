"""What A1111's own API tests, webuiapi and SillyTavern send, as they send it."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
import requests
import webuiapi
from PIL import Image

from .conftest import RunningServer, ServerFactory

# AUTOMATIC1111's test/test_txt2img.py payload, as written there.
A1111_TXT2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0, "enable_hr": False, "eta": 0, "firstphase_height": 0,
    "firstphase_width": 0, "height": 64, "n_iter": 1, "negative_prompt": "", "prompt": "example prompt",
    "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0, "s_tmin": 0, "sampler_index": "Euler a",
    "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "steps": 3, "styles": [], "subseed": -1,
    "subseed_strength": 0, "tiling": False, "width": 64,
}  # fmt: skip
A1111_VARIANTS = [
    {}, {"negative_prompt": "example negative prompt"},
    {"prompt": "((emphasis)), (emphasis1:1.1), [to:1], [from::2], [from:to:0.3], [alt|alt1]"}, {"height": 128},
    {"enable_hr": True}, {"tiling": True}, {"restore_faces": True}, {"sampler_index": "PLMS"},
    {"sampler_index": "DDIM"}, {"sampler_index": "UniPC"}, {"n_iter": 2}, {"batch_size": 2},
]  # fmt: skip


def test_a1111s_own_txt2img_payloads_pass_as_written_on_the_tiny_pair(real_server_factory: ServerFactory) -> None:
    with real_server_factory() as server:
        for variant in A1111_VARIANTS:
            payload = {**A1111_TXT2IMG, **variant}
            answer = requests.post(server.url + "/sdapi/v1/txt2img", json=payload, timeout=300)
            assert answer.status_code == 200, (variant, answer.text)
            images = [Image.open(io.BytesIO(base64.b64decode(item))) for item in answer.json()["images"]]
            assert len(images) == payload["batch_size"] * payload["n_iter"], variant
            scale = 2 if payload["enable_hr"] else 1  # A1111's default hr_scale
            assert all(image.size == (payload["width"] * scale, payload["height"] * scale) for image in images), variant
            info = json.loads(answer.json()["info"])
            assert (info["width"], info["height"], info["refined"]) == (payload["width"], payload["height"], True)
            count = len(images)
            assert len(info["all_seeds"]) == len(info["all_prompts"]) == len(info["infotexts"]) == count
            assert (
                info["infotexts"][0].startswith(payload["prompt"]) and f"Seed: {info['seed']}" in info["infotexts"][0]
            )
            assert info["sd_model_hash"] and len(info["job_timestamp"]) == 14


def test_a1111s_own_options_and_listing_tests_pass(server: RunningServer) -> None:
    url_options = server.url + "/sdapi/v1/options"
    pre_value = requests.get(url_options).json()["send_seed"]
    assert requests.post(url_options, json={"send_seed": not pre_value}).status_code == 200
    assert requests.get(url_options).json()["send_seed"] == (not pre_value)
    assert (server.settings.data_dir / "a1111-options.json").exists()  # kept across restarts
    for url in ("cmd-flags", "samplers", "upscalers", "sd-models", "hypernetworks", "face-restorers",
                "realesrgan-models", "prompt-styles", "embeddings", "schedulers", "sd-vae", "latent-upscale-modes",
                "loras"):  # fmt: skip
        assert requests.get(f"{server.url}/sdapi/v1/{url}").status_code == 200, url


def test_webuiapi_lists_and_sets_the_model(server: RunningServer) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port))
    assert sorted(api.util_get_scheduler_names()) == ["automatic", "beta", "exponential", "karras", "normal",
                                                      "sgm_uniform", "uniform"]  # fmt: skip
    assert api.util_get_sampler_names() == sorted(
        [
            "Euler",
            "Euler a",
            "Heun",
            "DPM2",
            "DPM2 a",
            "LMS",
            "DPM++ 2M",
            "DPM++ 2M SDE",
            "DPM++ 3M SDE",
            "DPM++ SDE",
            "DDIM",
            "PLMS",
            "UniPC",
            "DEIS",
        ]
    )  # webuiapi sorts them; fmt: skip
    title = api.util_get_model_names()[0]
    api.util_set_model(title, find_closest=False)
    assert api.util_get_current_model() == title
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}


def test_an_unknown_checkpoint_is_refused_with_a1111s_error_shape(server: RunningServer) -> None:
    answer = requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "nope.safetensors"})
    assert answer.status_code == 404
    body = answer.json()
    assert set(body) >= {"error", "detail", "body", "errors"} and "nope.safetensors" in body["errors"]
    assert "sd_model_checkpoint" not in json.loads((server.settings.data_dir / "a1111-options.json").read_text()
                                                   if (server.settings.data_dir / "a1111-options.json").exists()
                                                   else "{}")  # fmt: skip


@pytest.mark.parametrize(
    ("width", "height", "made"), [(960, 540, (960, 536)), (540, 960, (536, 960)), (65, 71, (64, 64))]
)
def test_sizes_are_rounded_down_to_a_multiple_of_8_as_a1111_does(
    server: RunningServer, width: int, height: int, made: tuple[int, int]
) -> None:
    payload: dict[str, Any] = {"prompt": "a cat", "width": width, "height": height, "steps": 2}
    answer = requests.post(server.url + "/sdapi/v1/txt2img", json=payload)
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["width"], info["height"]) == made
    assert Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).size == made
