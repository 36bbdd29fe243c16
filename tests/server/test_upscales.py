"""Upscale jobs over HTTP: A1111's extras (its own tests' payloads, the webuiapi client), png-info, the native
route and listings, hires fix by an upscaler model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import webuiapi
from PIL import Image, PngImagePlugin

from sdxl_refinery import ImageService
from sdxl_refinery.engine.upscaling import Upscalers
from tests.fakes import FakeEngine
from tests.upscaler_files import write_hostile_pth, write_tiny_esrgan

from .conftest import RunningServer, ServerFactory
from .test_edits import decoded, picture


def b64(image: Image.Image, text: str | None = None) -> str:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def upscaler_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "upscalers"
    write_tiny_esrgan(folder / "tiny-4x.safetensors", scale=4)
    write_tiny_esrgan(folder / "tiny-2x.pth", scale=2, seed=5)
    write_hostile_pth(folder / "hostile.pth", tmp_path / "ran")
    return folder


def _with_upscalers(service: ImageService, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service.upscaling, "_upscalers", Upscalers(folder, "cpu"))


@pytest.fixture
def web(
    server_factory: ServerFactory, fake: tuple[ImageService, FakeEngine], upscaler_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningServer]:  # fmt: skip
    _with_upscalers(fake[0], upscaler_folder, monkeypatch)
    with server_factory() as server:
        yield server


# A1111's own tests (test/test_extras.py), their payloads as sent.
EXTRAS_SINGLE = {"resize_mode": 0, "show_extras_results": True, "gfpgan_visibility": 0, "codeformer_visibility": 0,
                 "codeformer_weight": 0, "upscaling_resize": 2, "upscaling_resize_w": 128, "upscaling_resize_h": 128,
                 "upscaling_crop": True, "upscaler_1": "Lanczos", "upscaler_2": "None",
                 "extras_upscaler_2_visibility": 0}  # fmt: skip


def test_a1111s_extras_tests_pass(web: RunningServer) -> None:
    image = b64(picture(48, 32))
    single = requests.post(web.url + "/sdapi/v1/extra-single-image", json={**EXTRAS_SINGLE, "image": image}, timeout=60)
    assert single.status_code == 200, single.text
    assert decoded(single.json()["image"]).size == (96, 64)
    assert "Postprocess upscaler: Lanczos" in single.json()["html_info"]
    batch = {**EXTRAS_SINGLE, "imageList": [{"data": image, "name": "a.png"}, {"data": b64(picture(20, 20)),
                                                                              "name": "b.png"}]}  # fmt: skip
    answer = requests.post(web.url + "/sdapi/v1/extra-batch-images", json=batch, timeout=60)
    assert answer.status_code == 200, answer.text
    assert [decoded(text).size for text in answer.json()["images"]] == [(96, 64), (40, 40)]
    info = requests.post(web.url + "/sdapi/v1/png-info", json={"image": image}, timeout=60)
    assert info.status_code == 200 and info.json()["info"] == ""


def test_webuiapi_upscales_with_a_model_and_blends_a_second(web: RunningServer) -> None:
    api = webuiapi.WebUIApi(baseurl=web.url + "/sdapi/v1")
    result = api.extra_single_image(image=picture(24, 16), upscaler_1="tiny-4x", upscaling_resize=4)
    assert result.image.size == (96, 64)
    blended = api.extra_single_image(image=picture(24, 16), upscaler_1="tiny-4x", upscaler_2="Nearest",
                                     extras_upscaler_2_visibility=0.5, upscaling_resize=4)  # fmt: skip
    assert blended.image.size == (96, 64) and blended.image.tobytes() != result.image.tobytes()
    to_size = api.extra_single_image(image=picture(24, 16), upscaler_1="tiny-2x", resize_mode=1,
                                     upscaling_resize_w=40, upscaling_resize_h=40, upscaling_crop=True)  # fmt: skip
    assert to_size.image.size == (40, 40)
    text = to_size.image.info["parameters"]
    assert "Postprocess upscale to: 40x40" in text and "Postprocess upscaler: tiny-2x" in text


def test_extras_keep_a_pngs_own_text_and_png_info_reads_it_as_a1111_does(web: RunningServer) -> None:
    text = "a red fox\nNegative prompt: blurry\nSteps: 30, Sampler: Euler, CFG scale: 8, Seed: 7, Size: 48x32"
    answer = requests.post(web.url + "/sdapi/v1/extra-single-image",
                           json={**EXTRAS_SINGLE, "image": b64(picture(48, 32), text)}, timeout=60)  # fmt: skip
    upscaled = answer.json()["image"]
    info = requests.post(web.url + "/sdapi/v1/png-info", json={"image": upscaled}, timeout=60).json()
    assert info["info"].startswith(text + ", Postprocess upscale by: 2")
    fields = info["parameters"]
    assert (fields["Prompt"], fields["Negative prompt"], fields["Steps"]) == ("a red fox", "blurry", "30")
    assert (fields["Size-1"], fields["Size-2"], fields["Postprocess upscaler"]) == ("48", "32", "Lanczos")
    assert "refinery" in info["items"]  # our JSON record beside it


def test_bad_extras_are_refused_naming_a1111s_field(web: RunningServer) -> None:
    image = b64(picture(16, 16))
    cases = [({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1", "no upscaler 'R-ESRGAN 4x+'"),
             ({"upscaler_1": "hostile"}, "upscaler_1", "not readable as weights only"),
             ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration"),
             ({"upscaling_resize": 1000}, "upscaling_resize", "less than or equal to 8")]  # fmt: skip
    for change, field, words in cases:
        answer = requests.post(web.url + "/sdapi/v1/extra-single-image",
                               json={**EXTRAS_SINGLE, "image": image, **change}, timeout=60)  # fmt: skip
        assert answer.status_code == 422, (change, answer.text)
        assert field in answer.text and words in answer.text, (change, answer.text)
    assert web.client.get("/v1/jobs").json()["total"] == 0  # refused before any job


def test_listings_show_models_first_for_a1111_and_reasons_natively(web: RunningServer) -> None:
    rows = requests.get(web.url + "/sdapi/v1/upscalers", timeout=60).json()
    assert [row["name"] for row in rows] == ["None", "Lanczos", "Nearest", "tiny-2x", "tiny-4x"]
    assert rows[-1]["scale"] == 4 and rows[-1]["model_path"].endswith("tiny-4x.safetensors")
    native = web.client.get("/v1/upscalers").json()
    assert {row["name"]: row["architecture"] for row in native["models"]} == {"tiny-2x": "ESRGAN", "tiny-4x": "ESRGAN"}
    assert "weights only" in native["unusable"]["hostile"]


def test_a_native_upscale_is_a_job_with_progress_and_a_png(web: RunningServer) -> None:
    image = "data:image/png;base64," + b64(picture(300, 200))
    answer = web.client.post("/v1/upscales", json={"images": [image], "upscaler": "tiny-4x", "scale": 4})
    assert answer.status_code == 202, answer.text
    job = web.wait_for(answer.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    assert job["progress"]["stage_name"] == "upscale" and job["progress"]["percent"] == 100
    assert job["request"]["kind"] == "upscale" and job["request"]["images"][0]["width"] == 300
    png = web.client.get(job["result"]["urls"][0])
    assert Image.open(io.BytesIO(png.content)).size == (1200, 800)
    listed = web.client.get("/v1/jobs").json()["items"][0]  # a listing shows an upscale among generations
    assert listed["id"] == job["id"] and listed["request"]["upscaler"] == "tiny-4x"


def test_a_queued_upscale_can_be_cancelled(web: RunningServer, fake_engine: FakeEngine) -> None:
    fake_engine.pause_at(1)
    first = web.client.post("/v1/jobs", json={"prompt": "a kite", "width": 64, "height": 64}).json()["id"]
    assert fake_engine.paused.wait(60)
    queued = web.client.post("/v1/upscales", json={"images": [b64(picture())], "upscaler": "Lanczos"}).json()["id"]
    assert web.client.post(f"/v1/jobs/{queued}/cancel").status_code == 200
    fake_engine.resume()
    assert web.wait_for(first, {"succeeded"})["status"] == "succeeded"
    assert web.job(queued)["status"] == "cancelled"


def test_hires_fix_with_an_upscaler_model_through_the_a1111_route(
    real_server_factory: ServerFactory, service: ImageService, upscaler_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _with_upscalers(service, upscaler_folder, monkeypatch)
    payload: dict[str, Any] = {"prompt": "a castle", "width": 64, "height": 64, "steps": 4, "enable_hr": True,
                               "hr_scale": 1.5, "hr_upscaler": "tiny-2x", "hr_second_pass_steps": 4,
                               "denoising_strength": 0.5, "seed": 9}  # fmt: skip
    with real_server_factory() as real:
        answer = requests.post(real.url + "/sdapi/v1/txt2img", json=payload, timeout=300)
        assert answer.status_code == 200, answer.text
        assert decoded(answer.json()["images"][0]).size == (96, 96)
        assert "Hires upscaler: tiny-2x" in json.loads(answer.json()["info"])["infotexts"][0]
        latent = requests.post(real.url + "/sdapi/v1/txt2img", json={**payload, "hr_upscaler": "Latent"}, timeout=300)
        assert answer.json()["images"][0] != latent.json()["images"][0]  # the model's pixels, not the latents'
        unknown = requests.post(real.url + "/sdapi/v1/txt2img", json={**payload, "hr_upscaler": "4x-Nope"}, timeout=60)
        assert unknown.status_code == 422 and "hr_upscaler" in unknown.text and "4x-Nope" in unknown.text
