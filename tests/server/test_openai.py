"""The official `openai` client against the OpenAI-compatible routes."""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from ..fakes import FakeEngine
from ..waiting import patience
from .conftest import RunningServer, ServerFactory


def _client(server: RunningServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def test_generate_b64_images(server: RunningServer) -> None:
    answer = _client(server).images.generate(model="sdxl-refinery", prompt="a harbour at night", n=2,
                                             size="256x256", response_format="b64_json")  # fmt: skip
    assert len(answer.data) == 2 and answer.created > 0
    for item in answer.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json or "")))
        assert image.size == (256, 256)
        assert item.revised_prompt == "a harbour at night"
    job = server.client.get("/v1/jobs").json()["items"][0]
    assert job["client"] == "openai" and job["request"]["guidance_scale"] == 7.5
    assert job["result"]["metadata"]["refined"] is True


def test_quality_hd_means_high_quality_and_url_format_serves_the_file(server: RunningServer) -> None:
    answer = _client(server).images.generate(prompt="a fox", size="256x256", quality="hd", response_format="url")
    url = answer.data[0].url or ""
    assert url.startswith(server.url + "/v1/images/")
    assert httpx.get(url).headers["content-type"] == "image/png"
    assert server.client.get("/v1/jobs").json()["items"][0]["request"]["guidance_scale"] == 8.0


def test_wait_limit_names_the_job_to_poll(server_factory: ServerFactory, fake_engine: FakeEngine) -> None:
    with server_factory(sync_wait_seconds=0.3) as server:
        fake_engine.pause_at(1)  # held until the wait limit has passed
        with pytest.raises(openai.APIStatusError) as caught:
            _client(server).images.generate(prompt="slow", size="512x512")
        fake_engine.resume()
        assert caught.value.status_code == 504
        error = caught.value.body
        assert isinstance(error, dict)
        job_id = error["job_id"]
        assert f"poll GET /v1/jobs/{job_id}" in error["message"]
        assert server.wait_for(job_id, {"succeeded"})["result"]["images"] == ["image.png"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"size": "huge"}, "size"), ({"size": "9" * 5000}, "size"), ({"size": "1000x1001"}, "size"), ({"n": 0}, "n"),
     ({"n": 99}, "n"), ({"prompt": " "}, "prompt"), ({"response_format": "gif"}, "response_format")],
)  # fmt: skip
def test_bad_input_is_openais_400_naming_its_param(server: RunningServer, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(server).images.generate(**{"prompt": "x", **fields})
    assert caught.value.status_code == 400 and caught.value.param == param
    assert caught.value.type == "invalid_request_error" and caught.value.code == "invalid_value"
    assert server.client.get("/v1/jobs").json()["total"] == 0


def test_full_queue_is_a_429_rate_limit_error_with_retry_after(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(max_queue=1) as server:
        fake_engine.pause_at(1)
        held = server.client.post("/v1/jobs", json={"prompt": "x"}).json()["id"]
        assert fake_engine.paused.wait(patience(60))
        with pytest.raises(openai.RateLimitError) as caught:
            _client(server).images.generate(prompt="one too many")
        assert caught.value.code == "rate_limit_exceeded" and int(caught.value.response.headers["retry-after"]) > 0
        server.client.post(f"/v1/jobs/{held}/cancel")


def test_url_images_open_in_an_img_without_the_key_and_nothing_else_does(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        answer = _client(server, "s3cret").images.generate(prompt="a fox", n=2, size="256x256", response_format="url")
        first, second = (item.url or "" for item in answer.data)
        assert "expires=" in first and "signature=" in first
        shown = httpx.get(first)  # what a browser's <img> does: no Authorization header
        assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
        bare, query = first.split("?")
        assert httpx.get(bare).status_code == 401  # the image itself still needs the key
        other_image = second.split("?")[0] + "?" + query  # a signature opens only its own path
        assert httpx.get(other_image).status_code == 401
        assert httpx.get(first.replace("signature=", "signature=0")).status_code == 401
        job_id = bare.split("/")[-2]
        assert httpx.get(f"{server.url}/v1/jobs/{job_id}?{query}").status_code == 401  # nor any other route


def test_an_expired_signature_no_longer_opens_the_image(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret", url_ttl_seconds=60) as server:
        answer = _client(server, "s3cret").images.generate(prompt="a fox", size="256x256", response_format="url")
        path = (answer.data[0].url or "").removeprefix(server.url).split("?")[0]
        signer = server.app.state.refinery.signer
        assert httpx.get(f"{server.url}{path}?{signer.query(path)}").status_code == 200
        expired = signer.query(path, now=time.time() - 61)
        assert httpx.get(f"{server.url}{path}?{expired}").status_code == 401


def test_a_wrong_key_is_openais_401_invalid_api_key(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError) as caught:
            _client(server, "wrong").images.generate(prompt="x")
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"


def test_without_a_wait_limit_the_call_waits_for_its_image(server: RunningServer, fake_engine: FakeEngine) -> None:
    """No limit by default (A1111's behaviour): a job held for a while still answers with its image."""
    fake_engine.pause_at(1)
    outcome: dict[str, Any] = {}
    call = threading.Thread(target=lambda: outcome.update(answer=_client(server).images.generate(prompt="slow")))
    call.start()
    assert fake_engine.paused.wait(patience(60))
    call.join(timeout=1.0)
    assert call.is_alive()  # still waiting, not answered without an image
    fake_engine.resume()
    call.join(timeout=patience(60))
    assert outcome["answer"].data[0].b64_json


def test_models_lists_the_served_model(server: RunningServer) -> None:
    models = _client(server).models.list()
    assert [model.id for model in models.data] == ["sdxl-refinery"]


def test_api_key_is_required_when_set(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            _client(server, "wrong").models.list()
        assert _client(server, "s3cret").models.list().data[0].id == "sdxl-refinery"
