"""img2img, inpainting, hires fix and OpenAI edits over a real server on the tiny pair, as real clients send them."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
import openai
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from .conftest import RunningServer, ServerFactory

# AUTOMATIC1111's test/test_img2img.py payload, as written there (its image is ours: a 64x64 picture).
A1111_IMG2IMG = {
    "batch_size": 1, "cfg_scale": 7, "denoising_strength": 0.75, "eta": 0, "height": 64, "include_init_images": False,
    "inpaint_full_res": False, "inpaint_full_res_padding": 0, "inpainting_fill": 0, "inpainting_mask_invert": False,
    "mask": None, "mask_blur": 4, "n_iter": 1, "negative_prompt": "", "override_settings": {},
    "prompt": "example prompt", "resize_mode": 0, "restore_faces": False, "s_churn": 0, "s_noise": 1, "s_tmax": 0,
    "s_tmin": 0, "sampler_index": "Euler a", "seed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "steps": 3, "styles": [], "subseed": -1, "subseed_strength": 0, "tiling": False, "width": 64,
}  # fmt: skip


def picture(width: int = 64, height: int = 64) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(200, 40, 90))
    return image


def mask_image(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, width // 2 - 1, height - 1), fill=255)  # the left half is repainted
    return mask


def b64(image: Image.Image, prefix: str = "") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return prefix + base64.b64encode(buffer.getvalue()).decode()


def decoded(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


@pytest.fixture
def real(real_server_factory: ServerFactory) -> Any:
    with real_server_factory() as server:
        yield server


def test_a1111s_own_img2img_and_inpainting_payloads_pass(real: RunningServer) -> None:
    init = picture()
    mask_pixels = np.asarray(mask_image())
    for variant in ({}, {"mask": b64(mask_image())}, {"mask": b64(mask_image()), "inpainting_mask_invert": True},
                    {"init_images": [b64(init, "data:image/png;base64,")], "include_init_images": True}):  # fmt: skip
        payload = {"init_images": [b64(init)], **A1111_IMG2IMG, **variant}
        answer = requests.post(real.url + "/sdapi/v1/img2img", json=payload, timeout=300)
        assert answer.status_code == 200, (variant, answer.text)
        body = answer.json()
        image = decoded(body["images"][0])
        assert image.size == (64, 64)
        info = json.loads(body["info"])
        assert info["denoising_strength"] == 0.75 and info["refined"]
        assert "Denoising strength: 0.75" in info["infotexts"][0] and "Init image hash: " in info["infotexts"][0]
        assert ("init_images" in body["parameters"]) == bool(variant.get("include_init_images"))
        if "mask" in variant:  # blurred 4 px: columns well away from the edge are the original's, exactly
            kept = slice(44, 64) if not variant.get("inpainting_mask_invert") else slice(0, 20)
            assert np.array_equal(np.asarray(image)[:, kept], np.asarray(init)[:, kept])
            assert "Mask blur: 4" in info["infotexts"][0] and mask_pixels.any()


def test_webuiapi_img2img_and_inpainting_work(real: RunningServer) -> None:
    host, port = real.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=4)
    result = api.img2img(images=[picture()], prompt="a red disc", width=64, height=64, denoising_strength=0.5,
                         seed=4)  # fmt: skip
    assert result.image.size == (64, 64) and result.info["denoising_strength"] == 0.5
    painted = api.img2img(images=[picture()], mask_image=mask_image(), prompt="a red disc", width=64, height=64,
                          inpainting_fill=1, inpaint_full_res=False, mask_blur=0, seed=4)  # fmt: skip
    right = np.asarray(painted.image)[:, 32:]
    assert np.array_equal(right, np.asarray(picture())[:, 32:])


def test_hires_fix_as_sillytavern_sends_it(real: RunningServer) -> None:
    payload = {"prompt": "a castle", "width": 64, "height": 64, "steps": 4, "enable_hr": True, "hr_scale": 1.5,
               "hr_upscaler": "Latent (bicubic antialiased)", "hr_second_pass_steps": 4, "denoising_strength": 0.5,
               "seed": 9}  # fmt: skip
    answer = requests.post(real.url + "/sdapi/v1/txt2img", json=payload, timeout=300)
    assert answer.status_code == 200, answer.text
    assert decoded(answer.json()["images"][0]).size == (96, 96)
    text = json.loads(answer.json()["info"])["infotexts"][0]
    assert "Hires upscale: 1.5" in text and "Hires upscaler: Latent (bicubic antialiased)" in text
    lanczos = {**payload, "hr_upscaler": "Lanczos", "hr_resize_x": 80, "hr_resize_y": 0}
    answer = requests.post(real.url + "/sdapi/v1/txt2img", json=lanczos, timeout=300)
    assert decoded(answer.json()["images"][0]).size == (80, 80)
    listed = requests.get(real.url + "/sdapi/v1/latent-upscale-modes").json()
    assert {"name": "Latent (nearest-exact)"} in listed
    assert [row["name"] for row in requests.get(real.url + "/sdapi/v1/upscalers").json()] == [
        "None",
        "Lanczos",
        "Nearest",
    ]


def _openai(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_openai_sdk_edits_with_a_mask_and_makes_variations(real: RunningServer) -> None:
    init = picture()
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=(0, 0, 0, 0))  # transparent: the area to edit
    buffer, mask_buffer = io.BytesIO(), io.BytesIO()
    init.save(buffer, format="PNG")
    mask.save(mask_buffer, format="PNG")
    client = _openai(real)
    edited = client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="a blue sky", n=1,
                                mask=("mask.png", mask_buffer.getvalue(), "image/png"))  # fmt: skip
    image = decoded(edited.data[0].b64_json or "")
    assert image.size == (64, 64)
    pixels, original = np.asarray(image.convert("RGB")).astype(int), np.asarray(init).astype(int)
    assert np.array_equal(pixels[:, 44:], original[:, 44:])  # opaque in the mask: kept exactly
    assert np.abs(pixels[:, :20] - original[:, :20]).max() > 10  # transparent: redrawn
    varied = client.images.create_variation(image=("in.png", buffer.getvalue(), "image/png"), n=2)
    assert len(varied.data) == 2 and all(decoded(item.b64_json or "").size == (64, 64) for item in varied.data)


def test_openai_edit_errors_name_the_parameter(real: RunningServer) -> None:
    client = _openai(real)
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("in.png", b"not an image", "image/png"), prompt="x")
    assert caught.value.body["param"] == "image" and "readable image" in caught.value.body["message"]
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="x",
                           mask=("m.png", buffer.getvalue(), "image/png"))  # fmt: skip
    assert caught.value.body["param"] == "mask" and "transparency" in caught.value.body["message"]


def test_native_jobs_take_base64_images_and_never_read_server_paths(real: RunningServer) -> None:
    body = {"prompt": "a fox", "init_image": b64(picture(), "data:image/png;base64,"), "strength": 0.5,
            "num_inference_steps": 4, "refiner_steps": 2}  # fmt: skip
    job = requests.post(real.url + "/v1/jobs", json=body)
    assert job.status_code == 202, job.text
    done = real.wait_for(job.json()["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded"
    recorded = done["request"]["init_image"]
    assert set(recorded) == {"sha256", "width", "height"} and (recorded["width"], recorded["height"]) == (64, 64)
    for value in ("/etc/hostname", "../../data/jobs.db", "aGVsbG8="):
        answer = requests.post(real.url + "/v1/jobs", json={"prompt": "a fox", "init_image": value})
        assert answer.status_code == 422 and "init_image" in answer.text, value
    answer = requests.post(real.url + "/v1/jobs", json={"prompt": "a fox", "init_image": recorded})
    assert answer.status_code == 422 and "give the image itself" in answer.text


def test_bad_images_are_refused_before_any_work(real: RunningServer) -> None:
    bomb = Image.new("L", (5000, 4000))  # 20 M pixels that compress to a few kilobytes
    cases = [
        ({"init_images": ["%%%not base64%%%"]}, "init_images[0]", "not base64"),
        ({"init_images": [b64(bomb)]}, "init_images[0]", "at most 16777216 pixels"),
        ({"init_images": []}, "init_images", "exactly one"),
        ({"init_images": [b64(picture())], "denoising_strength": 1.5}, "denoising_strength", "less than or equal"),
        ({"init_images": [b64(picture())], "mask": "bm90IGFuIGltYWdl"}, "mask", "readable image"),
    ]
    for body, field, words in cases:
        answer = requests.post(real.url + "/sdapi/v1/img2img", json={**A1111_IMG2IMG, **body})
        assert answer.status_code == 422, (body, answer.text)
        assert field in answer.text and words in answer.text, answer.text
    hires = {"prompt": "x", "width": 2048, "height": 2048, "enable_hr": True, "hr_scale": 3}
    answer = requests.post(real.url + "/sdapi/v1/txt2img", json=hires)
    assert answer.status_code == 422 and "hr_scale" in answer.text
    assert real.client.get("/v1/jobs").json()["total"] == 0
