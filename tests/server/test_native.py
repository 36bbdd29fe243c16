"""The native API on a real uvicorn server: submit, watch, list, cancel, images, limits.

Over the fake engine (the server is the subject), except the end-to-end test at the
end, which renders with the tiny SDXL pair.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
from PIL import Image

from ..fakes import FakeEngine
from ..waiting import patience
from .conftest import SMALL_JOB, RunningServer, ServerFactory


def _submit(server: RunningServer, **fields: Any) -> dict[str, Any]:
    answer = server.client.post("/v1/jobs", json={**SMALL_JOB, **fields})
    assert answer.status_code == 202, answer.text
    body: dict[str, Any] = answer.json()
    return body


def _held(server: RunningServer, engine: FakeEngine, **fields: Any) -> str:
    """Submit a job that the fake engine holds after its first step, and return it once it is held there."""
    engine.pause_at(1)
    job_id: str = _submit(server, **fields)["id"]
    assert engine.paused.wait(patience(60)), "the job never started"
    return job_id


def test_submit_poll_and_fetch_the_image(server: RunningServer) -> None:
    accepted = _submit(server, seed=3, n=2)
    assert accepted["status"] == "queued" and accepted["position"] >= 1
    job = server.wait_for(accepted["id"], {"succeeded"})
    assert job["result"]["seeds"] == [3, 4] and job["result"]["images"] == ["image-1.png", "image-2.png"]
    assert job["progress"]["percent"] == 100.0 and job["attempts"] == 1
    png = server.client.get(job["result"]["urls"][1])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == (256, 256)
    assert json.loads(image.info["refinery"])["seeds"] == [3, 4]


def test_list_is_newest_first_and_paged(server: RunningServer) -> None:
    ids = [_submit(server, seed=i)["id"] for i in range(3)]
    for job_id in ids:
        server.wait_for(job_id, {"succeeded"})
    page = server.client.get("/v1/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and [job["id"] for job in page["items"]] == ids[::-1][:2]
    rest = server.client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()
    assert [job["id"] for job in rest["items"]] == [ids[0]]
    done = server.client.get("/v1/jobs", params={"status": "succeeded"}).json()
    assert done["total"] == 3


def test_events_stream_progress_previews_and_done(server_factory: ServerFactory, fake_engine: FakeEngine) -> None:
    with server_factory(preview_every=2) as server:
        fake_engine.pause_at(0)  # held before its first step until the stream is open
        job_id = _submit(server, num_inference_steps=8, refiner_steps=4)["id"]
        events: list[tuple[str, dict[str, Any]]] = []
        with server.client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            event = ""
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line.split(":", 1)[1])))
                    if event == "state":
                        fake_engine.resume()
                    if event == "done":
                        break
    names = [name for name, _ in events]
    assert names[0] == "state" and names[-1] == "done"
    progress = [data for name, data in events if name == "progress"]
    assert {p["stage_name"] for p in progress} == {"base", "refiner"}
    assert progress[-1]["percent"] == 100.0 and progress[-1]["eta_seconds"] == 0.0
    previews = [data for name, data in events if name == "preview"]
    assert previews and previews[0]["image"].startswith("data:image/png;base64,")
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["job"]["result"]["images"] == ["image.png"]


def test_cancel_running_job_stops_it_and_writes_nothing(server: RunningServer, fake_engine: FakeEngine) -> None:
    job_id = _held(server, fake_engine)
    running = server.job(job_id)
    assert running["status"] == "running" and running["progress"]["step"] == 1
    cancelled = server.client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    job = server.wait_for(job_id, {"cancelled"})
    assert job["progress"]["step"] == 1
    assert not (server.settings.data_dir / "images" / job_id / "image.png").exists()


def test_cancel_queued_job_is_immediate(server: RunningServer, fake_engine: FakeEngine) -> None:
    first = _held(server, fake_engine)
    second = _submit(server)["id"]
    assert server.client.get(f"/v1/jobs/{second}").json()["position"] == 1
    answer = server.client.post(f"/v1/jobs/{second}/cancel").json()
    assert answer["status"] == "cancelled"
    server.client.post(f"/v1/jobs/{first}/cancel")
    server.wait_for(first, {"cancelled"})
    assert server.client.get(f"/v1/jobs/{second}").json()["status"] == "cancelled"


def test_full_queue_answers_429_with_retry_after(server_factory: ServerFactory, fake_engine: FakeEngine) -> None:
    with server_factory(max_queue=2) as server:
        ids = [_held(server, fake_engine), _submit(server)["id"]]
        refused = server.client.post("/v1/jobs", json=SMALL_JOB)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) > 0
        assert "queue is full" in refused.json()["detail"]
        for job_id in ids:
            server.client.post(f"/v1/jobs/{job_id}/cancel")
        for job_id in ids:
            server.wait_for(job_id, {"cancelled"})


BAD = [("prompt", " "), ("width", 1001), ("height", 100), ("num_inference_steps", 0), ("refiner_steps", 501),
       ("refiner_strength", 0), ("switch_at", 1.0), ("guidance_scale", 31), ("n", 17), ("mode", "fast"),
       ("seed", -5), ("colour", "red")]  # fmt: skip


def test_each_bad_field_is_a_422_naming_it(server: RunningServer) -> None:
    for field, value in BAD:
        answer = server.client.post("/v1/jobs", json={**SMALL_JOB, field: value})
        assert answer.status_code == 422, (field, answer.text)
        assert answer.json()["detail"][0]["loc"][-1] == field, (field, answer.text)
    over = server.client.post("/v1/jobs", json={**SMALL_JOB, "width": 4096})
    assert over.status_code == 422 and over.json()["detail"][0] == {
        "loc": ["body", "width"],
        "msg": "must be at most 2048 on this server, not 4096; sizes that work here are multiples of 8 from 64 to 2048",
        "type": "value_error",
    }
    assert server.client.post("/v1/jobs", content=b"not json", headers={"content-type": "application/json"}
                              ).status_code == 422  # fmt: skip
    assert server.client.get("/v1/jobs").json()["total"] == 0


def test_image_route_refuses_paths_outside_the_data_folder(server: RunningServer) -> None:
    job = server.wait_for(_submit(server)["id"], {"succeeded"})
    assert server.client.get(f"/v1/images/{job['id']}/image.png").status_code == 200
    for path in (f"/v1/images/{job['id']}/..%2F..%2Fjobs.sqlite3", "/v1/images/..%2F..%2F..%2Fetc/passwd",
                 f"/v1/images/{job['id']}/../../jobs.sqlite3", f"/v1/images/{job['id']}/image.png%00.txt",
                 "/v1/images/%2e%2e/%2e%2e/jobs.sqlite3", f"/v1/images/{job['id']}/.image.png.x.part"):  # fmt: skip
        answer = httpx.get(server.url + path)
        assert answer.status_code == 404, path
        assert b"SQLite" not in answer.content and b"root:" not in answer.content


def test_body_size_cap(server_factory: ServerFactory) -> None:
    with server_factory(max_body_bytes=1_000_000) as server:
        _body_size_cap(server)


def _body_size_cap(server: RunningServer) -> None:
    answer = server.client.post("/v1/jobs", json={**SMALL_JOB, "prompt": "x" * 2_000_000})
    assert answer.status_code == 413 and "REFINERY_MAX_BODY_BYTES" in answer.json()["detail"]
    openai_shape = server.client.post("/v1/images/generations", json={"prompt": "x" * 2_000_000})
    assert openai_shape.status_code == 413 and openai_shape.json()["error"]["code"] == "request_too_large"
    a1111_shape = server.client.post("/sdapi/v1/img2img", json={"prompt": "x" * 2_000_000})
    assert a1111_shape.status_code == 413 and "REFINERY_MAX_BODY_BYTES" in a1111_shape.json()["errors"]

    def chunks(total: int) -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        yield b'{"prompt": "a small boat", "num_inference_steps": 2'
        for _ in range(total // 65536):
            yield b" " * 65536  # JSON whitespace: the size is the body's, not the prompt's
        yield b"}"

    chunked = server.client.post("/v1/jobs", content=chunks(2_000_000), headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "larger than" in chunked.json()["detail"]
    small = server.client.post("/v1/jobs", content=chunks(65536), headers={"content-type": "application/json"})
    assert small.status_code == 202  # a chunked body under the cap is read whole and accepted


def test_health_ready_and_metrics(server: RunningServer) -> None:
    assert server.client.get("/health").json() == {"status": "ok"}
    server.wait_for(_submit(server)["id"], {"succeeded"})
    ready = server.client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["sdxl_available"] is True and ready.json()["device"] == "cpu"
    assert ready.json()["precision"] == "fp32" and ready.json()["queue_depth"] == 0
    metrics = server.client.get("/metrics").text
    assert 'refinery_jobs{status="succeeded"} 1.0' in metrics
    assert "refinery_queue_depth 0.0" in metrics
    assert 'refinery_step_seconds_count{stage="refiner"} 3.0' in metrics
    assert 'refinery_job_duration_seconds_count{status="succeeded"} 1.0' in metrics


def test_real_images_end_to_end_reproduce_from_their_png(real_server_factory: ServerFactory) -> None:
    """The tiny SDXL pair through the server: the PNG it serves carries a recipe that renders the same image."""
    with real_server_factory() as server:
        job = server.wait_for(_submit(server, seed=11)["id"], {"succeeded"})
        png = server.client.get(job["result"]["urls"][0]).content
        again = server.wait_for(server.client.post("/v1/jobs", json=json.loads(Image.open(io.BytesIO(png)).info[
            "refinery"])["request"] | {"seed": 11}).json()["id"], {"succeeded"})  # fmt: skip
        second = server.client.get(again["result"]["urls"][0]).content
    first_pixels = Image.open(io.BytesIO(png)).convert("RGB").tobytes()
    assert first_pixels == Image.open(io.BytesIO(second)).convert("RGB").tobytes()
    assert job["result"]["metadata"]["models"]["base"] != "fake-base"


def test_an_sdxl_sized_image_fits_the_default_body_cap(server: RunningServer) -> None:
    """A 1024x1024 photo-like PNG (about 1.5 MB; 2 MB as base64) goes through every face that takes images."""
    import base64

    import numpy as np
    import openai

    noise = np.random.default_rng(1).integers(0, 256, (1024, 1024, 3), dtype=np.uint8) // 4 * 4
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    png = buffer.getvalue()
    assert len(png) > 1_400_000
    text = base64.b64encode(png).decode()
    small = {"width": 256, "height": 256, "num_inference_steps": 4, "refiner_steps": 2}
    native = server.client.post("/v1/jobs", json={"prompt": "a wall", "init_image": text, **small})
    assert native.status_code == 202, native.text[:300]
    a1111 = server.client.post("/sdapi/v1/img2img", json={"prompt": "a wall", "init_images": [text], "steps": 4,
                                                          "width": 256, "height": 256})  # fmt: skip
    assert a1111.status_code == 200 and a1111.json()["images"], a1111.text[:300]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    edited = client.images.edit(image=("wall.png", png, "image/png"), prompt="a wall", size="256x256")
    assert len(edited.data) == 1
