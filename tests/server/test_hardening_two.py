"""Hardening, round two (issue 31): the signing key, URL queries that were 500s, an empty Idempotency-Key,
A1111 options (deep, concurrent, oversized) and a clip skip deeper than the encoders."""

from __future__ import annotations

import io
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image, PngImagePlugin

from sdxl_refinery import ImageService
from sdxl_refinery.config import Settings
from sdxl_refinery.engine.catalog import ModelFolder
from sdxl_refinery.errors import StorageError
from sdxl_refinery.server.app import create_app
from sdxl_refinery.server.routes.a1111_settings import OPTIONS_FILE
from sdxl_refinery.server.signing import KEY_FILE

from ..fakes import FakeEngine, fake_service
from ..waiting import patience, poll
from .conftest import RunningServer, ServerFactory


def _url_image(server: RunningServer) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
    answer = client.images.generate(prompt="a fox", size="256x256", response_format="url")
    return answer.data[0].url or ""


@pytest.mark.parametrize("content", [b"", b"short"])
def test_an_empty_or_short_signing_key_is_refused_at_start(tmp_path: Path, content: bytes) -> None:
    (tmp_path / KEY_FILE).write_bytes(content)
    service, _engine = fake_service()
    try:
        with pytest.raises(StorageError, match="holds [05] bytes; a signing key needs at least 16"):
            create_app(Settings(data_dir=tmp_path, base_model="tiny", refiner_model="tiny"), service=service)
    finally:
        service.close()


def test_deleting_the_signing_key_revokes_every_url_at_once(server_factory: ServerFactory, tmp_path: Path) -> None:
    with server_factory(api_key="s3cret") as server:
        url = _url_image(server)
        assert httpx.get(url).status_code == 200
        (tmp_path / "data" / KEY_FILE).unlink()
        assert httpx.get(url).status_code == 401  # revoked without a restart
        fresh = _url_image(server)  # a new key is made for new URLs
        assert httpx.get(fresh).status_code == 200 and (tmp_path / "data" / KEY_FILE).stat().st_size >= 16
        assert httpx.get(url).status_code == 401  # the old ones stay revoked


def test_unicode_digits_and_non_ascii_signatures_are_401_not_500(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        path = _url_image(server).removeprefix(server.url).split("?")[0]
        for query in ("expires=%C2%B2&signature=x", "expires=99999999999&signature=%C3%A9",
                      "expires=%D9%A3%D9%A3&signature=ab"):  # fmt: skip
            assert httpx.get(f"{server.url}{path}?{query}").status_code == 401, query


def test_an_empty_idempotency_key_is_no_key(server: RunningServer) -> None:
    body = {"prompt": "a kite", "width": 64, "height": 64, "num_inference_steps": 2, "refiner_steps": 1}
    first = server.client.post("/v1/jobs", json=body, headers={"Idempotency-Key": ""})
    other = server.client.post("/v1/jobs", json={**body, "prompt": "a boat"}, headers={"Idempotency-Key": ""})
    assert (first.status_code, other.status_code) == (202, 202)  # not a 409 for reusing "" with another body
    assert first.json()["id"] != other.json()["id"]


def _nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def test_deep_option_values_are_refused_and_a_stored_one_is_left_out(server: RunningServer, tmp_path: Path) -> None:
    deep = server.client.post("/sdapi/v1/options", json={"samples_format": "png", "hostile": _nested(300)})
    assert deep.status_code == 422 and deep.json()["detail"][0]["loc"][-1] == "hostile"
    assert "nests 300 levels deep" in deep.text
    assert "hostile" not in server.client.get("/sdapi/v1/options").json()
    # A file an older server wrote with such a value: the options still read, without it.
    (tmp_path / "data" / OPTIONS_FILE).write_text(json.dumps({"hostile": _nested(300), "kept": 1}))
    options = server.client.get("/sdapi/v1/options")
    assert options.status_code == 200 and options.json()["kept"] == 1 and "hostile" not in options.json()
    (tmp_path / "data" / OPTIONS_FILE).write_text("[1, 2")  # not JSON at all
    assert server.client.get("/sdapi/v1/options").status_code == 200
    assert server.client.post("/sdapi/v1/txt2img", json={"prompt": "a cup", "steps": 2}).status_code == 200


def test_concurrent_option_posts_each_keep_their_update(server: RunningServer) -> None:
    def post(index: int) -> int:
        return httpx.post(f"{server.url}/sdapi/v1/options", json={f"key_{index}": index}, timeout=60).status_code

    with ThreadPoolExecutor(40) as pool:
        assert set(pool.map(post, range(40))) == {200}
    options = server.client.get("/sdapi/v1/options").json()
    assert {name: options.get(name) for name in (f"key_{index}" for index in range(40))} == {
        f"key_{index}": index for index in range(40)}  # fmt: skip


def test_stored_options_are_capped(server: RunningServer, tmp_path: Path) -> None:
    piece = "y" * 100_000
    assert server.client.post("/sdapi/v1/options", json={"a": piece}).status_code == 200
    assert server.client.post("/sdapi/v1/options", json={"b": piece}).status_code == 200
    third = server.client.post("/sdapi/v1/options", json={"c": piece})
    assert third.status_code == 422 and third.json()["detail"][0]["loc"][-1] == "options"
    assert "at most 262144 bytes" in third.text
    stored = json.loads((tmp_path / "data" / OPTIONS_FILE).read_text())
    assert set(stored) == {"a", "b"} and (tmp_path / "data" / OPTIONS_FILE).stat().st_size <= 262144
    assert server.client.post("/sdapi/v1/options", json={"a": "short"}).status_code == 200  # replacing fits


def test_a_clip_skip_deeper_than_the_encoders_is_a_422_at_submission(server: RunningServer, tmp_path: Path) -> None:
    # The tiny pair's text encoders have 3 layers: clip skip 4 cannot run. Nothing may be queued for it.
    def named(answer: httpx.Response) -> str:
        assert answer.status_code == 422, answer.text
        assert "must be at most 3 for these models" in answer.text
        return str(answer.json()["detail"][0]["loc"][-1])

    poll(lambda: server.client.get("/ready").status_code == 200, "the fake engine to load")
    body = {"prompt": "a cup", "steps": 2}
    assert named(server.client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 4})) == (
        "CLIP_stop_at_last_layers")  # fmt: skip
    assert named(server.client.post("/v1/jobs", json={"prompt": "a cup", "clip_skip": 4})) == "clip_skip"
    assert named(server.client.post("/sdapi/v1/txt2img", json={**body, "clip_skip": 4})) == "clip_skip"
    overridden = {**body, "override_settings": {"CLIP_stop_at_last_layers": 4}}
    assert named(server.client.post("/sdapi/v1/txt2img", json=overridden)) == (
        "override_settings.CLIP_stop_at_last_layers")  # fmt: skip
    # Stored by an older server (or before the models changed): each request says which option to fix.
    (tmp_path / "data" / OPTIONS_FILE).write_text(json.dumps({"CLIP_stop_at_last_layers": 4}))
    assert named(server.client.post("/sdapi/v1/txt2img", json=body)) == "CLIP_stop_at_last_layers"
    assert server.client.get("/sdapi/v1/options").status_code == 200
    assert server.client.get("/v1/jobs").json()["total"] == 0
    assert server.client.post("/sdapi/v1/txt2img", json={**body, "clip_skip": 3}).status_code == 200


@pytest.mark.parametrize("settings", ["Steps: 2, Size: 64", "Steps: 2, Size: 1x2x3", 'Steps: 2, Sampler: "\\q"'])
def test_variations_of_a_png_with_malformed_parameters_use_its_prompt(server: RunningServer, settings: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a red barn\n{settings}")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG", pnginfo=info)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    answer = client.images.create_variation(image=("barn.png", buffer.getvalue(), "image/png"), size="256x256")
    assert len(answer.data) == 1
    jobs = server.client.get("/v1/jobs").json()["items"]
    assert jobs[0]["request"]["prompt"] == "a red barn"


def test_a_queued_job_whose_checkpoint_was_deleted_fails_naming_the_folder_not_the_hub(
    server_factory: ServerFactory, fake: tuple[ImageService, FakeEngine], tmp_path: Path
) -> None:
    models = tmp_path / "data" / "models"
    checkpoint = models / "owner" / "name"  # listed as `owner/name`: the shape of a Hub id
    (checkpoint / "unet").mkdir(parents=True)
    (checkpoint / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    service, engine = fake
    service.models_folder = ModelFolder(models)
    engine.pause_at(0)
    small = {"prompt": "a kite", "width": 64, "height": 64, "num_inference_steps": 2, "refiner_steps": 1}
    with server_factory() as server:
        assert server.client.post("/v1/jobs", json=small).status_code == 202
        assert engine.paused.wait(patience(60))
        named = server.client.post("/v1/jobs", json={**small, "base_model": "owner/name"})
        assert named.status_code == 202, named.text
        shutil.rmtree(models / "owner")  # deleted while the job waits in the queue
        engine.resume()
        job = server.wait_for(named.json()["id"], {"failed", "succeeded"})
    assert job["status"] == "failed"
    assert "no model 'owner/name' in the models folder" in job["error"], job["error"]
    assert len(engine.runs) == 1  # only the first job reached the engine


def test_a_data_folder_made_inside_a_clone_stays_out_of_git_status(server: RunningServer, tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    status = subprocess.run(["git", "-C", str(tmp_path), "status", "--porcelain", "--untracked-files=all"],
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert (tmp_path / "data" / "jobs.sqlite3").exists() and "data/" not in status, status


def test_an_unknown_lora_in_an_empty_folder_says_the_folder_is_empty(server: RunningServer) -> None:
    answer = server.client.post("/v1/jobs", json={"prompt": "x", "loras": [{"name": "nope"}]})
    assert answer.status_code == 422 and "no such LoRA (the LoRA folder holds none)" in answer.text
    assert "known: none" not in answer.text
