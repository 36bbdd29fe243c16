"""The `webuiapi` package (what A1111 scripts use) against the A1111-compatible routes."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image

from ..fakes import FakeEngine
from ..waiting import patience
from .conftest import RunningServer, ServerFactory


def _api(server: RunningServer, **auth: str) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), **auth)


def test_txt2img_with_webuiapi(server: RunningServer) -> None:
    result = _api(server).txt2img(prompt="a tram in the rain", negative_prompt="blur", steps=6, width=256,
                                  height=256, seed=5, batch_size=2, cfg_scale=7.0)  # fmt: skip
    assert len(result.images) == 2 and all(image.size == (256, 256) for image in result.images)
    assert result.info["all_seeds"] == [5, 6] and result.info["refined"] is True
    assert result.parameters["prompt"] == "a tram in the rain"
    job = server.client.get("/v1/jobs").json()["items"][0]
    assert job["request"]["num_inference_steps"] == 6 and job["request"]["guidance_scale"] == 7.0
    assert job["request"]["mode"] == "sequential" and job["client"] == "a1111"


def test_refiner_switch_at_selects_handoff_and_unknown_fields_are_ignored(server: RunningServer) -> None:
    answer = server.client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "steps": 10, "width": 256, "height": 256, "refiner_checkpoint": "None",
        "refiner_switch_at": 0.7, "sampler_name": "DPM++ 2M", "alwayson_scripts": {}, "enable_hr": False,
        "n_iter": 2, "send_images": False})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["images"] == []
    job = server.client.get("/v1/jobs").json()["items"][0]
    assert (job["request"]["mode"], job["request"]["switch_at"], job["request"]["n"]) == ("handoff", 0.7, 2)
    assert job["result"]["metadata"]["base_steps"] == 7
    # A refiner A1111 would not find either is refused, as A1111 refuses it ("Could not find checkpoint").
    unknown = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "refiner_checkpoint": "sd_xl_refiner_1.0"})
    assert unknown.status_code == 422 and "refiner_checkpoint" in unknown.text


def test_progress_shows_step_and_preview_and_interrupt_keeps_the_image(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(preview_every=1) as server:
        fake_engine.pause_at(1)  # the first step is always stored (later ones at most every 0.5 s)
        outcome: dict[str, Any] = {}
        worker = threading.Thread(target=lambda: outcome.update(server.client.post("/sdapi/v1/txt2img", json={
            "prompt": "x", "steps": 10, "width": 256, "height": 256}).json()))  # fmt: skip
        worker.start()
        assert fake_engine.paused.wait(patience(60)), "the job never started"
        progress = server.client.get("/sdapi/v1/progress").json()
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 10
        assert progress["state"]["sampling_step"] == 1 and progress["textinfo"] == "base step 1/10"
        assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).format == "PNG"
        assert server.client.post("/sdapi/v1/interrupt").json()["interrupted"]
        worker.join(timeout=patience(60))
        assert len(outcome["images"]) == 1  # as A1111 does: the image as it stood
        info = json.loads(outcome["info"])
        assert info["interrupted"] is True and info["refined"] is False
        job = server.client.get(f"/v1/jobs/{info['job_id']}").json()
        assert job["status"] == "succeeded" and job["result"]["metadata"]["base_steps"] == 1
        idle = server.client.get("/sdapi/v1/progress").json()
        assert idle["progress"] == 0.0 and idle["current_image"] is None


@pytest.mark.parametrize("route", ["/sdapi/v1/skip", "/sdapi/v1/interrupt"])
def test_skip_and_interrupt_leave_queued_jobs_alone(server: RunningServer, fake_engine: FakeEngine, route: str) -> None:
    fake_engine.pause_at(2)
    first = server.client.post("/v1/jobs", json={"prompt": "first", "num_inference_steps": 4}).json()["id"]
    second = server.client.post("/v1/jobs", json={"prompt": "second", "num_inference_steps": 4}).json()["id"]
    assert fake_engine.paused.wait(patience(60))
    assert server.client.post(route).json() == {"interrupted": first}
    stopped = server.wait_for(first, {"succeeded"})
    assert stopped["result"]["metadata"]["interrupted"] is True and stopped["result"]["images"] == ["image.png"]
    fake_engine.resume()  # the second job runs to its end
    finished = server.wait_for(second, {"succeeded"})
    assert finished["result"]["metadata"]["interrupted"] is False
    assert finished["result"]["metadata"]["base_steps"] == 4


def test_the_native_cancel_still_discards_an_a1111_job(server: RunningServer, fake_engine: FakeEngine) -> None:
    fake_engine.pause_at(1)
    outcome: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: outcome.update(server.client.post("/sdapi/v1/txt2img", json={
        "prompt": "x", "steps": 4}).json()))  # fmt: skip
    caller.start()
    assert fake_engine.paused.wait(patience(60))
    job_id = server.client.get("/v1/jobs").json()["items"][0]["id"]
    assert server.client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    caller.join(timeout=patience(60))
    assert outcome["images"] == [] and json.loads(outcome["info"])["status"] == "cancelled"


def test_models_options_and_samplers(server: RunningServer) -> None:
    api = _api(server)
    models = api.get_sd_models()
    assert [model["filename"] for model in models] == ["tiny"]  # one model for both roles: listed once
    assert api.get_options()["sd_model_checkpoint"] == models[0]["title"] == api.util_get_current_model()
    assert [sampler["name"] for sampler in api.get_samplers()][:3] == ["Euler", "Euler a", "Heun"]


def test_basic_auth_with_the_key_as_password(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        with pytest.raises(RuntimeError, match="401"):
            _api(server).txt2img(prompt="x", steps=2, width=256, height=256)
        result = _api(server, username="me", password="s3cret").txt2img(prompt="x", steps=2, width=256, height=256)
        assert len(result.images) == 1


def test_with_a_wait_limit_an_unfinished_job_is_an_error_never_an_empty_answer(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(sync_wait_seconds=0.3) as server:
        fake_engine.pause_at(1)
        answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4})
        assert answer.status_code == 504
        body = answer.json()
        assert body["error"] == "Timeout" and f"poll GET /v1/jobs/{body['job_id']}" in body["errors"]
        fake_engine.resume()
        assert server.wait_for(body["job_id"], {"succeeded"})["result"]["images"] == ["image.png"]


def test_a_client_that_disconnects_leaves_its_job_running(server: RunningServer, fake_engine: FakeEngine) -> None:
    fake_engine.pause_at(1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": "x", "steps": 4}, timeout=0.5)
    assert fake_engine.paused.wait(patience(60))
    job_id = server.client.get("/v1/jobs").json()["items"][0]["id"]
    fake_engine.resume()
    assert server.wait_for(job_id, {"succeeded"})["client"] == "a1111"


@pytest.mark.parametrize(
    ("body", "sampler", "schedule"),
    [({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "Karras"),  # A1111's older combined name
     ({"sampler_name": "euler a", "scheduler": "sgm_uniform"}, "Euler a", "SGM Uniform"),  # any case, machine names
     ({"sampler_index": "UniPC"}, "UniPC", "Automatic"),  # A1111's older field
     ({"sampler_name": "Heun", "sampler_index": "DDIM", "scheduler": "Karras"}, "Heun", "Karras")],
)  # fmt: skip
def test_samplers_by_a1111_names(server: RunningServer, body: dict[str, Any], sampler: str, schedule: str) -> None:
    answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 3, **body})
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert (info["sampler_name"], info["scheduler"]) == (sampler, schedule)
    assert f"Sampler: {sampler}, Schedule type: {schedule}" in info["infotexts"][0]


@pytest.mark.parametrize(
    ("body", "named", "listed"),
    [({"sampler_name": "DPM fast"}, "sampler_name", "DPM++ 2M SDE"),
     ({"sampler_name": "DDIM", "scheduler": "Karras"}, "scheduler", "SGM Uniform"),
     ({"scheduler": "Align Your Steps"}, "scheduler", "Exponential")],
)  # fmt: skip
def test_unknown_sampler_names_are_refused_listing_the_valid_ones(
    server: RunningServer, body: dict[str, Any], named: str, listed: str
) -> None:
    answer = server.client.post("/sdapi/v1/txt2img", json={"prompt": "x", **body})
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"][-1] == named and listed in detail["msg"]
    assert server.client.get("/v1/jobs").json()["total"] == 0
