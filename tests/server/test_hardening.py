"""Careless and hostile input gets a 4xx naming the field, never a 500 (part of the hardening issue)."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from ..fakes import FakeEngine
from ..waiting import patience
from .conftest import RunningServer, ServerFactory

JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("prompt", "said"),
    [("\ud800 a lone surrogate", "lone surrogate U+D800"),
     ("a \x1b[31mred\x1b[0m cat", "control characters: U+001B"),
     ("\u200b\u200c\u200d\ufeff", "must not be empty or blank"),
     ("a cat\nNegative prompt: forged", "Negative prompt:"),
     ("(" * 1000 + "cat", "attention weight of 'cat' comes to 2.47e+41")],
)  # fmt: skip
def test_bad_prompt_text_is_a_422_naming_the_prompt(server: RunningServer, prompt: str, said: str) -> None:
    def post(route: str) -> httpx.Response:  # JSON escapes (\\ud800), as a browser's JSON.stringify sends them
        return server.client.post(route, content=json.dumps({"prompt": prompt}), headers=JSON)

    for route in ("/v1/jobs", "/sdapi/v1/txt2img"):
        answer = post(route)
        assert answer.status_code == 422, (route, answer.text)
        detail = answer.json()["detail"][0]
        assert detail["loc"][-1] == "prompt" and said in detail["msg"]
    openai = post("/v1/images/generations")
    assert openai.status_code == 400 and openai.json()["error"]["param"] == "prompt"
    assert server.client.get("/v1/jobs").json()["total"] == 0


def test_multiline_prompts_still_work(server: RunningServer) -> None:
    prompt = "a cat\non a mat\twith a hat"
    body = {"prompt": prompt, "num_inference_steps": 2, "refiner_steps": 1, "width": 64, "height": 64}
    answer = server.client.post("/v1/jobs", json=body)
    assert answer.status_code == 202
    job = server.wait_for(answer.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded" and job["request"]["prompt"] == prompt  # kept whole, not cleaned away
    png = server.client.get(job["result"]["urls"][0])
    assert Image.open(io.BytesIO(png.content)).info["parameters"].startswith(prompt + "\n")


def test_head_answers_every_get_route(server: RunningServer) -> None:
    for path in ("/health", "/ready", "/v1/jobs", "/v1/schema", "/sdapi/v1/options", "/", "/favicon.ico"):
        head, get = httpx.head(server.url + path), httpx.get(server.url + path)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"], path


def test_a_key_with_spaces_and_non_ascii_characters_matches(server_factory: ServerFactory) -> None:
    with server_factory(api_key="clé secrète 42") as server:
        bearer = {"Authorization": "Bearer clé secrète 42".encode()}  # UTF-8 bytes on the wire
        assert httpx.get(server.url + "/v1/jobs", headers=bearer).status_code == 200
        assert httpx.get(server.url + "/v1/jobs", headers={"Authorization": "Bearer cle secrete 42"}).status_code == 401


def test_a_foreign_host_header_is_refused(server: RunningServer) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    assert httpx.get(server.url + "/v1/jobs", headers={"Host": "evil.example"}).status_code == 400
    for name in ("localhost", "127.0.0.1"):
        port = server.url.rsplit(":", 1)[1]
        assert httpx.get(server.url + "/v1/jobs", headers={"Host": f"{name}:{port}"}).status_code == 200


def test_a_cross_site_post_cannot_interrupt_or_submit(server: RunningServer, fake_engine: FakeEngine) -> None:
    fake_engine.pause_at(1)
    job_id = server.client.post("/v1/jobs", json={"prompt": "mine", "num_inference_steps": 3}).json()["id"]
    assert fake_engine.paused.wait(patience(60))
    evil = {"Origin": "http://evil.example"}
    refused = httpx.post(server.url + "/sdapi/v1/interrupt", headers=evil)
    assert refused.status_code == 403 and "REFINERY_CORS_ORIGINS" in refused.json()["detail"]
    assert httpx.post(server.url + "/v1/jobs", json={"prompt": "theirs"}, headers=evil).status_code == 403
    assert httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": "null"}).status_code == 403
    assert httpx.get(server.url + "/v1/jobs", headers=evil).status_code == 200  # reading is not changing
    fake_engine.resume()
    done = server.wait_for(job_id, {"succeeded"})
    assert done["result"]["metadata"]["interrupted"] is False  # the drive-by interrupt never reached it
    same_site = httpx.post(server.url + "/v1/jobs", json={"prompt": "from the page", "num_inference_steps": 2},
                           headers={"Origin": server.url})  # fmt: skip
    assert same_site.status_code == 202


def test_listed_origins_may_call(server_factory: ServerFactory) -> None:
    with server_factory(cors_origins=["http://app.example"]) as server:
        answer = httpx.post(server.url + "/v1/jobs", json={"prompt": "x", "num_inference_steps": 2},
                            headers={"Origin": "http://app.example"})  # fmt: skip
        assert answer.status_code == 202 and answer.headers["access-control-allow-origin"] == "http://app.example"


def test_which_hosts_a_server_answers() -> None:
    from sdxl_refinery.config import Settings

    assert Settings().served_hosts() == ["127.0.0.1", "localhost", "::1"]
    assert Settings(host="0.0.0.0", api_key="k").served_hosts() == ["*"]  # every interface: the key protects it
    assert Settings(allowed_hosts=["refinery.lan"]).served_hosts() == ["refinery.lan"]


def test_listings_stay_small_and_the_job_has_it_whole(server_factory: ServerFactory) -> None:
    prompt = "a very long description, " * 16_000  # 400 kB, under the body cap
    with server_factory(max_prompt_tokens=10**6) as server:
        job_id = server.client.post("/v1/jobs", json={"prompt": prompt, "num_inference_steps": 2}).json()["id"]
        server.wait_for(job_id, {"succeeded"})
        _check_listing(server, job_id, prompt)


def _check_listing(server: RunningServer, job_id: str, prompt: str) -> None:
    listing = server.client.get("/v1/jobs?limit=100")
    assert len(listing.content) < 20_000
    item = listing.json()["items"][0]
    assert item["brief"] and len(item["request"]["prompt"]) == 301 and "request" not in item["result"]["metadata"]
    assert server.job(job_id)["request"]["prompt"] == prompt


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_prompt_over_the_token_cap_is_refused_before_queueing(server: RunningServer, field: str) -> None:
    too_long = {"prompt": "a cat", field: "cat " * 1200}  # 1,200 CLIP tokens; the cap is 1,000
    answer = server.client.post("/v1/jobs", json=too_long)
    assert answer.status_code == 422
    detail = answer.json()["detail"][0]
    assert detail["loc"][-1] == field and "takes 1200 CLIP tokens" in detail["msg"] and "at most 1000" in detail["msg"]
    if field == "prompt":
        openai = server.client.post("/v1/images/generations", json=too_long)
        assert openai.status_code == 400 and openai.json()["error"]["param"] == "prompt"
    assert server.client.get("/v1/jobs").json()["total"] == 0
    fits = server.client.post("/v1/jobs", json={"prompt": "(cat:1.1) " * 900, "num_inference_steps": 2})
    assert fits.status_code == 202  # attention syntax does not count: 900 tokens
