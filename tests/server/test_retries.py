"""A retried request never queues a second job: Idempotency-Key, and retries of the synchronous calls."""

from __future__ import annotations

import threading
from typing import Any

import httpx
import openai
import pytest

from ..fakes import FakeEngine
from ..waiting import patience, poll
from .conftest import RunningServer

ATTACHED_RETRY = 'refinery_requests_attached_total{reason="retry"}'


def _attached(server: RunningServer) -> float:
    for line in server.client.get("/metrics").text.splitlines():
        if line.startswith(ATTACHED_RETRY):
            return float(line.split()[-1])
    return 0.0


def test_the_openai_sdk_retrying_a_timed_out_call_makes_one_job_and_gets_the_image(
    server: RunningServer, fake_engine: FakeEngine
) -> None:
    fake_engine.pause_at(1)  # the render outlives the client's timeout, so the SDK retries
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=2.0, max_retries=3)
    outcome: dict[str, Any] = {}
    call = threading.Thread(target=lambda: outcome.update(answer=client.images.generate(prompt="a slow fox")))
    call.start()
    poll(lambda: _attached(server) >= 1, "the SDK's retry to attach to the job")
    fake_engine.resume()
    call.join(timeout=patience(60))
    assert outcome["answer"].data[0].b64_json  # the retry got the image
    jobs = server.client.get("/v1/jobs").json()
    assert jobs["total"] == 1 and jobs["items"][0]["status"] == "succeeded"
    # Delivered: asking again on purpose (a "regenerate") renders again.
    client.images.generate(prompt="a slow fox")
    assert server.client.get("/v1/jobs").json()["total"] == 2


def test_an_a1111_call_repeated_after_a_dropped_connection_attaches(
    server: RunningServer, fake_engine: FakeEngine
) -> None:
    body = {"prompt": "a tram", "steps": 4, "seed": 3}
    fake_engine.pause_at(1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=0.5)
    assert fake_engine.paused.wait(patience(60))
    outcome: dict[str, Any] = {}
    again = threading.Thread(target=lambda: outcome.update(answer=server.client.post("/sdapi/v1/txt2img", json=body)))
    again.start()
    poll(lambda: _attached(server) >= 1, "the repeated call to attach")
    fake_engine.resume()
    again.join(timeout=patience(60))
    assert outcome["answer"].status_code == 200 and len(outcome["answer"].json()["images"]) == 1
    assert server.client.get("/v1/jobs").json()["total"] == 1


def test_an_idempotency_key_names_one_job(server: RunningServer) -> None:
    job = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 4}
    first = server.client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k-1"})
    again = server.client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202 and first.json()["id"] == again.json()["id"]
    other = server.client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "k-2"})
    assert other.json()["id"] != first.json()["id"]
    reused = server.client.post("/v1/jobs", json={**job, "prompt": "a boat"}, headers={"Idempotency-Key": "k-1"})
    assert reused.status_code == 409 and first.json()["id"] in reused.json()["detail"]
    assert server.client.post("/v1/jobs", json=job).json()["id"] != first.json()["id"]  # no key: a new job
    assert server.client.get("/v1/jobs").json()["total"] == 3


def test_idempotency_keys_belong_to_their_caller(server_factory: Any) -> None:
    with server_factory(api_key="s3cret") as server:
        job = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 2}
        bearer = {"Authorization": "Bearer s3cret", "Idempotency-Key": "same"}
        first = server.client.post("/v1/jobs", json=job, headers=bearer).json()["id"]
        basic = httpx.post(server.url + "/v1/jobs", json=job, auth=("someone", "s3cret"),
                           headers={"Idempotency-Key": "same"}).json()["id"]  # fmt: skip
        assert basic == first  # the same key presented another way is the same caller
        too_long = server.client.post("/v1/jobs", json=job, headers={**bearer, "Idempotency-Key": "k" * 256})
        assert too_long.status_code == 422 and too_long.json()["detail"][0]["loc"][-1] == "Idempotency-Key"
