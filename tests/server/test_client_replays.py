"""Open WebUI and SillyTavern, replayed call for call against a real server.

The sequences follow their code: Open WebUI's backend/open_webui/routers/images.py
(automatic1111 and openai engines) and SillyTavern's src/endpoints/stable-diffusion.js
with the body its stable-diffusion extension builds (defaults: sampler DDIM,
scheduler normal, clip skip 1, 512x512, 20 steps, CFG 7).
"""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import httpx
import pytest
from PIL import Image

from ..fakes import FakeEngine
from ..waiting import patience, poll
from .conftest import RunningServer, ServerFactory


def _basic(user_and_password: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(user_and_password.encode()).decode()}


def _png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    assert image.format == "PNG"
    return image


# -- Open WebUI -----------------------------------------------------------------------------------


def test_open_webui_automatic1111_engine(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        web = httpx.Client(base_url=server.url, headers=_basic("webui:s3cret"), timeout=60)
        # 1. The admin saves the URL: verify_url reads the options.
        assert web.get("/sdapi/v1/options").status_code == 200
        # 2. The model picker lists sd-models as {id: title, name: model_name}.
        models = web.get("/sdapi/v1/sd-models").json()
        picked = models[0]["title"]
        assert models[0]["model_name"]
        # 3. set_image_model: read the options, change the checkpoint, post the whole dict back.
        options = web.get("/sdapi/v1/options").json()
        options["sd_model_checkpoint"] = picked
        web.post("/sdapi/v1/options", json=options).raise_for_status()
        assert web.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == picked  # get_image_model
        # 4. A chat asks for an image: its size, steps and the admin's AUTOMATIC1111_PARAMS merged in.
        admin_params = {"cfg_scale": 7, "sampler_name": "Euler", "override_settings": {"CLIP_stop_at_last_layers": 2}}
        data = {"prompt": "a lighthouse at dusk", "batch_size": 1, "width": 512, "height": 512, "steps": 4,
                "negative_prompt": "blurry", **admin_params}  # fmt: skip
        answer = web.post("/sdapi/v1/txt2img", json=data)
        answer.raise_for_status()
        result = answer.json()
        assert [_png(image).size for image in result["images"]] == [(512, 512)]
        info = json.loads(result["info"])  # Open WebUI stores it with the file
        assert (info["cfg_scale"], info["clip_skip"], info["steps"]) == (7, 2, 4)
        assert "Clip skip: 2" in info["infotexts"][0]
        # Without the key nothing opens.
        assert httpx.get(server.url + "/sdapi/v1/options").status_code == 401


def test_open_webui_openai_engine(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        headers = {"Authorization": "Bearer s3cret", "Content-Type": "application/json"}
        url = server.url + "/v1/images/generations"
        # A model answering in base64: Open WebUI asks for b64_json.
        data = {"model": "sdxl-refinery", "prompt": "a red fox", "n": 1, "size": "512x512",
                "response_format": "b64_json"}  # fmt: skip
        answer = httpx.post(url, json=data, headers=headers, timeout=60)
        answer.raise_for_status()
        assert _png(answer.json()["data"][0]["b64_json"]).size == (512, 512)
        # A model answering with URLs: no response_format; the image is fetched with the same headers
        # (and must be an image/* content type), or put in an <img> by a browser without them.
        data = {"model": "sdxl-refinery", "prompt": "a blue fox", "n": 1, "size": "512x512",
                "response_format": "url"}  # fmt: skip
        answer = httpx.post(url, json=data, headers=headers, timeout=60)
        answer.raise_for_status()
        image_url = answer.json()["data"][0]["url"]
        fetched = httpx.get(image_url, headers={"Authorization": "Bearer s3cret"})
        assert fetched.headers["content-type"].split("/")[0] == "image"
        assert httpx.get(image_url).status_code == 200  # signed: opens in an <img> too
        # An absent size takes IMAGE_SIZE's default of Open WebUI, which it always sends; ours is 1024.
        error = httpx.post(url, json={"prompt": "x", "size": "500x500"}, headers=headers, timeout=60)
        assert error.status_code == 400 and error.json()["error"]["param"] == "size"


# -- SillyTavern -----------------------------------------------------------------------------------


def _sillytavern_body(server: RunningServer, **settings: Any) -> dict[str, Any]:
    """What SillyTavern's extension posts (its server forwards the whole body, url and auth included)."""
    body = {
        "url": server.url, "auth": "", "prompt": "a knight in a library", "negative_prompt": "lowres",
        "sampler_name": "DDIM", "scheduler": "normal", "steps": 4, "cfg_scale": 7, "width": 512, "height": 512,
        "restore_faces": False, "enable_hr": False, "hr_upscaler": "Latent", "hr_scale": 2,
        "hr_additional_modules": [], "denoising_strength": 0.7, "hr_second_pass_steps": 0,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "forge_additional_modules": None},
        "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
        "do_not_save_grid": False, "do_not_save_samples": False,
    }  # fmt: skip
    body.update(settings)
    return body


def test_sillytavern_connects_lists_and_sets_the_model(server: RunningServer) -> None:
    st = server.client
    assert st.get("/sdapi/v1/options").status_code == 200  # /ping
    samplers = [x["name"] for x in st.get("/sdapi/v1/samplers").json()]
    assert "DDIM" in samplers and "DPM++ 2M" in samplers  # its default sampler, and the usual pick
    schedulers = [x["name"] for x in st.get("/sdapi/v1/schedulers").json()]
    assert "normal" in schedulers and "karras" in schedulers  # its default schedule, and the usual pick
    assert [x["model_name"] for x in st.get("/sdapi/v1/sd-vae").json()] == []  # /vaes: nothing besides the model's
    upscalers = [x["name"] for x in st.get("/sdapi/v1/upscalers").json()]
    latent = [x["name"] for x in st.get("/sdapi/v1/latent-upscale-modes").json()]
    assert "Latent" in latent and "Lanczos" in upscalers  # SillyTavern lists both; "Latent" is its default
    assert "R-ESRGAN 4x+" not in upscalers  # nothing that needs a model file that is not installed
    models = [{"value": x["title"], "text": x["title"]} for x in st.get("/sdapi/v1/sd-models").json()]
    current = st.get("/sdapi/v1/options").json()["sd_model_checkpoint"]  # /get-model
    assert current == models[0]["value"]
    # /set-model: post the checkpoint, then poll progress until nothing runs or waits.
    assert st.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["value"]}).status_code == 200
    state = st.get("/sdapi/v1/progress").json()
    assert state["progress"] == 0.0 and state["state"]["job_count"] == 0


@pytest.mark.parametrize(
    ("width", "height", "made"),
    [(512, 512, (512, 512)), (960, 540, (960, 536)), (540, 960, (536, 960)), (600, 600, (600, 600)),
     (1216, 832, (1216, 832)), (1920, 1088, (1920, 1088))],
)  # fmt: skip
def test_sillytavern_generates_at_its_presets(
    server: RunningServer, width: int, height: int, made: tuple[int, int]
) -> None:
    answer = server.client.post("/sdapi/v1/txt2img", json=_sillytavern_body(server, width=width, height=height))
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert _png(data["images"][0]).size == made  # SillyTavern shows data.images[0]
    info = json.loads(data["info"])
    assert (info["width"], info["height"], info["clip_skip"]) == (*made, 1)
    assert (info["sampler_name"], info["scheduler"]) == ("DDIM", "Normal")  # its defaults, honoured


def test_sillytavern_abort_interrupts_and_the_next_image_renders(
    server: RunningServer, fake_engine: FakeEngine
) -> None:
    fake_engine.pause_at(2)
    outcome: dict[str, Any] = {}

    def generate() -> None:
        answer = httpx.post(server.url + "/sdapi/v1/txt2img", json=_sillytavern_body(server), timeout=patience(60))
        outcome.update(answer.json())

    caller = threading.Thread(target=generate)
    caller.start()
    assert fake_engine.paused.wait(patience(60)), "the job never started"
    # The user presses stop: SillyTavern's server posts /interrupt when its client goes away.
    assert server.client.post("/sdapi/v1/interrupt").json()["interrupted"]
    caller.join(timeout=patience(60))
    assert len(outcome["images"]) == 1 and json.loads(outcome["info"])["interrupted"] is True
    fake_engine.resume()
    again = server.client.post("/sdapi/v1/txt2img", json=_sillytavern_body(server, prompt="again")).json()
    assert json.loads(again["info"])["interrupted"] is False and len(again["images"]) == 1
    poll(lambda: server.client.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0, "an idle server")


# -- A1111 options and override_settings ---------------------------------------------------------------


def test_clip_skip_from_override_settings_stored_options_and_the_body(server: RunningServer) -> None:
    def clip_skip_of(body: dict[str, Any]) -> int:
        answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **body})
        assert answer.status_code == 200, answer.text
        value: int = json.loads(answer.json()["info"])["clip_skip"]
        return value

    assert clip_skip_of({}) == 1
    assert clip_skip_of({"override_settings": {"CLIP_stop_at_last_layers": 2}}) == 2
    assert server.client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 3}).status_code == 200
    assert clip_skip_of({}) == 3  # the stored option applies to every later A1111 request
    assert clip_skip_of({"override_settings": {"CLIP_stop_at_last_layers": 2}}) == 2  # the override wins
    assert clip_skip_of({"clip_skip": 1, "override_settings": {"CLIP_stop_at_last_layers": 2}}) == 1  # the body wins
    # A1111's options belong to the A1111 face, not to the native API.
    native = server.client.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}).json()
    assert server.job(native["id"])["request"]["clip_skip"] == 1


@pytest.mark.parametrize(
    ("override", "status", "named"),
    [({"CLIP_stop_at_last_layers": 40}, 422, "override_settings.CLIP_stop_at_last_layers"),
     ({"sd_vae": "sdxl_vae_fp16_fix.safetensors"}, 404, "override_settings.sd_vae"),
     ({"sd_model_checkpoint": "other.safetensors"}, 404, "override_settings.sd_model_checkpoint")],
)  # fmt: skip
def test_overrides_that_cannot_be_honoured_are_refused_before_queueing(
    server: RunningServer, override: dict[str, Any], status: int, named: str
) -> None:
    answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": override})
    assert answer.status_code == status
    assert named in answer.text
    assert server.client.get("/v1/jobs").json()["total"] == 0


def test_options_that_cannot_be_honoured_are_not_stored(server: RunningServer) -> None:
    assert server.client.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200  # the model's own
    bad_vae = server.client.post("/sdapi/v1/options", json={"sd_vae": "kl-f8-anime.ckpt"})
    assert bad_vae.status_code == 404 and bad_vae.json()["error"] == "VaeNotFound"
    bad_skip = server.client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0})
    assert bad_skip.status_code == 422 and "CLIP_stop_at_last_layers" in bad_skip.text
    options = server.client.get("/sdapi/v1/options").json()
    assert (options["sd_vae"], options["CLIP_stop_at_last_layers"]) == ("None", 1)
