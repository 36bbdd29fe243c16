"""The official `openai` client against the OpenAI-compatible routes."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from PIL import Image

from ..fakes import FakeEngine
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
    with server_factory(openai_wait_seconds=0.3) as server:
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


def test_bad_size_is_a_422_naming_size(server: RunningServer) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        _client(server).images.generate(prompt="x", size="huge")  # type: ignore[arg-type]
    assert "size" in str(caught.value)


def test_models_lists_the_served_model(server: RunningServer) -> None:
    models = _client(server).models.list()
    assert [model.id for model in models.data] == ["sdxl-refinery"]


def test_api_key_is_required_when_set(server_factory: ServerFactory) -> None:
    with server_factory(api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            _client(server, "wrong").models.list()
        assert _client(server, "s3cret").models.list().data[0].id == "sdxl-refinery"
