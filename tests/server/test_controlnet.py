"""ControlNet over HTTP: the A1111 extension's units as webuiapi sends them, its routes, and the native field."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from sdxl_refinery import ImageService
from sdxl_refinery.annotators import AnnotatorFolder
from sdxl_refinery.controlnets import ControlNetFolder
from tests.engine.test_annotators import by_hand, photo, write_tiny_dpt
from tests.engine.test_controlnet import _tiny_controlnet, edges

from .conftest import RunningServer, ServerFactory
from .test_edits import decoded, picture

IMAGE_MODULES = ["none", "canny", "invert", "threshold", "scribble_xdog", "lineart_standard", "t2ia_color_grid",
                 "tile_resample", "blur_gaussian", "recolor_luminance", "recolor_intensity"]  # fmt: skip


@pytest.fixture
def real(real_server_factory: ServerFactory, service: ImageService, tiny_pair: tuple[Path, Path], tmp_path: Path,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningServer]:  # fmt: skip
    _tiny_controlnet(tiny_pair[0], 1).save_pretrained(tmp_path / "controlnet" / "tiny-canny")
    monkeypatch.setattr(service, "controlnet_folder", ControlNetFolder(tmp_path / "controlnet"))
    with real_server_factory() as server:
        yield server


def test_webuiapi_controlnet_units_guide_the_image(real: RunningServer) -> None:
    api = webuiapi.WebUIApi(baseurl=real.url + "/sdapi/v1")
    common: dict[str, Any] = {"prompt": "a tower", "width": 64, "height": 64, "steps": 4, "seed": 5, "cfg_scale": 7}
    plain = api.txt2img(**common)
    unit = webuiapi.ControlNetUnit(image=edges(), module="none", model="tiny-canny [0123abcd]", weight=1.0,
                                   resize_mode="Just Resize")  # fmt: skip
    guided = api.txt2img(**common, controlnet_units=[unit])
    assert guided.image.size == (64, 64)
    difference = np.abs(np.asarray(guided.image, dtype=np.int16) - np.asarray(plain.image, dtype=np.int16)).max()
    assert difference > 10  # the unit reached the engine
    assert 'ControlNet 0: "Module: none, Model: tiny-canny, Weight: 1' in guided.info["infotexts"][0]
    off = webuiapi.ControlNetUnit(image=edges(), model="tiny-canny", enabled=False)
    unguided = api.txt2img(**common, controlnet_units=[off])
    assert np.array_equal(np.asarray(unguided.image), np.asarray(plain.image))  # a disabled unit is no unit


def test_the_extensions_routes(real: RunningServer) -> None:
    assert requests.get(real.url + "/controlnet/version", timeout=60).json() == {"version": 2}
    assert requests.get(real.url + "/controlnet/model_list", timeout=60).json() == {"model_list": ["tiny-canny"]}
    modules = requests.get(real.url + "/controlnet/module_list", timeout=60).json()["module_list"]
    assert modules == IMAGE_MODULES
    buffer = io.BytesIO()
    picture().save(buffer, format="PNG")
    body = {"controlnet_module": "canny", "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()],
            "controlnet_threshold_a": 50, "controlnet_threshold_b": 150}  # fmt: skip
    detected = requests.post(real.url + "/controlnet/detect", json=body, timeout=60).json()
    edge_map = np.asarray(decoded(detected["images"][0]))
    assert edge_map.shape == (64, 64, 3) and set(np.unique(edge_map)) == {0, 255}  # an edge map, white on black
    gradient = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))).convert("RGB").save(gradient, "PNG")
    body["controlnet_input_images"] = [base64.b64encode(gradient.getvalue()).decode()]
    levels = {}
    for level in (-1, 127, 30):  # the extension's -1: the module's default (threshold's 127)
        body.update(controlnet_module="threshold", controlnet_threshold_a=level)
        answer = requests.post(real.url + "/controlnet/detect", json=body, timeout=60).json()
        levels[level] = int((np.asarray(decoded(answer["images"][0]))[..., 0] == 255).sum())
    assert levels[-1] == levels[127] == 64 * 32 and levels[30] > levels[127]


def test_bad_units_are_refused_naming_the_a1111_field(real: RunningServer) -> None:
    buffer = io.BytesIO()
    edges().save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    cases = [({"model": "nope", "image": image}, "alwayson_scripts.controlnet.args.0.model", "no ControlNet 'nope'"),
             ({"model": "tiny-canny", "image": image, "module": "openpose"},
              "alwayson_scripts.controlnet.args.0.preprocessor", "needs annotator weights"),
             ({"model": "tiny-canny"}, "alwayson_scripts.controlnet.args.0.image",
              "needs a control image")]  # fmt: skip
    for unit, field, words in cases:
        body = {
            "prompt": "x",
            "width": 64,
            "height": 64,
            "steps": 2,
            "alwayson_scripts": {"ControlNet": {"args": [unit]}},
        }
        answer = requests.post(real.url + "/sdapi/v1/txt2img", json=body, timeout=60)
        assert answer.status_code == 422 and field in answer.text and words in answer.text, answer.text
    assert real.client.get("/v1/jobs").json()["total"] == 0


def test_the_native_field_takes_base64_units(real: RunningServer) -> None:
    buffer = io.BytesIO()
    edges().save(buffer, format="PNG")
    unit = {"model": "tiny-canny", "image": base64.b64encode(buffer.getvalue()).decode(), "weight": 0.5}
    job = real.client.post("/v1/jobs", json={"prompt": "a tower", "width": 64, "height": 64,
                                              "num_inference_steps": 4, "controlnets": [unit]}).json()  # fmt: skip
    done = real.wait_for(job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["request"]["controlnets"][0]["image"]["width"] == 64  # recorded by hash and size
    refused = real.client.post("/v1/jobs", json={"prompt": "x", "controlnets": [{**unit, "image": "/etc/passwd"}]})
    assert refused.status_code == 422 and "controlnets" in refused.text
    assert Image.open(io.BytesIO(real.client.get(done["result"]["urls"][0]).content)).size == (64, 64)


def test_ip_adapter_units_as_the_extension_takes_them_become_image_prompts(
    real_server_factory: ServerFactory, service: ImageService, tiny_pair: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from sdxl_refinery.ip_adapters import IpAdapterFolder
    from tests.engine.test_image_prompts import write_tiny_ip_adapter

    write_tiny_ip_adapter(tiny_pair[0], tmp_path / "ip-adapter", "tiny-ip", 1)
    monkeypatch.setattr(service, "ip_adapter_folder", IpAdapterFolder(tmp_path / "ip-adapter"))
    with real_server_factory() as real:
        api = webuiapi.WebUIApi(baseurl=real.url + "/sdapi/v1")
        common: dict[str, Any] = {"prompt": "a tower", "width": 64, "height": 64, "steps": 4, "seed": 5}
        plain = api.txt2img(**common)
        unit = webuiapi.ControlNetUnit(image=picture(), module="ip-adapter_clip_sdxl", model="tiny-ip [abcdef12]",
                                       weight=0.7)  # fmt: skip
        guided = api.txt2img(**common, controlnet_units=[unit])
        difference = np.abs(np.asarray(guided.image, dtype=np.int16) - np.asarray(plain.image, dtype=np.int16))
        assert difference.max() > 10
        assert 'IP-Adapter 0: "Model: tiny-ip, Weight: 0.7, Image hash:' in guided.info["infotexts"][0]
        assert real.client.get("/v1/ip-adapters").json()["ip_adapters"] == ["tiny-ip"]
        bad = webuiapi.ControlNetUnit(image=picture(), module="ip-adapter_clip_sdxl", model="nope")
        refused = requests.post(real.url + "/sdapi/v1/txt2img", json={**common, "alwayson_scripts": {
            "ControlNet": {"args": [bad.to_dict()]}}}, timeout=60)  # fmt: skip
        assert refused.status_code == 422 and "alwayson_scripts.controlnet.ip-adapters.0.model" in refused.text


@pytest.fixture(scope="module")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A tiny depth model and the photo's depth map by hand, both made before any server of the module starts
    (a load of theirs in another thread would leave a model built meanwhile on the meta device)."""
    root = tmp_path_factory.mktemp("annotators")
    write_tiny_dpt(root / "depth_midas")
    return root, by_hand(photo(), root / "depth_midas")


def test_depth_preprocessing_and_control_modes_over_http(annotators: tuple[Path, np.ndarray], real: RunningServer,
                                                         service: ImageService,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(service, "annotator_folder", AnnotatorFolder(annotators[0]))
    listed = requests.get(real.url + "/v1/controlnets", timeout=60).json()
    assert listed["controlnets"] == ["tiny-canny"] and listed["preprocessors"] == [*IMAGE_MODULES, "depth_midas"]
    assert listed["annotators"]["depth_midas"] is None and "openpose/detector" in listed["annotators"]["openpose"]
    modules = requests.get(real.url + "/controlnet/module_list", timeout=60).json()["module_list"]
    assert "depth_midas" in modules and "openpose" not in modules  # openpose's models are not in the folder
    buffer = io.BytesIO()
    photo().save(buffer, format="PNG")
    body = {"controlnet_module": "depth", "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()]}
    detected = requests.post(real.url + "/controlnet/detect", json=body, timeout=60).json()
    depth = np.asarray(decoded(detected["images"][0]), dtype=np.float64)[..., 0]
    assert np.abs(depth - annotators[1]).max() <= 1
    api = webuiapi.WebUIApi(baseurl=real.url + "/sdapi/v1")
    unit = webuiapi.ControlNetUnit(image=photo(), module="depth_midas", model="tiny-canny", control_mode=2)
    guided = api.txt2img(prompt="a tower", width=64, height=64, steps=4, seed=5, controlnet_units=[unit])
    assert "Module: depth_midas, Model: tiny-canny, Weight: 1" in guided.info["infotexts"][0]
    assert "Control Mode: ControlNet is more important" in guided.info["infotexts"][0]
    body["controlnet_module"] = "openpose"
    refused = requests.post(real.url + "/controlnet/detect", json=body, timeout=60)
    assert refused.status_code == 422 and "openpose/detector" in refused.text
