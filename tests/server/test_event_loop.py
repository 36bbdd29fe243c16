"""The event loop only routes (issue 31, item 3): `/health` answers within 100 ms at p99 while 16 clients send
4096x4096 images at once, and while the first request naming a large new checkpoint has it hashed.

The 100 ms bound is the issue's own measure of a loop that does not stall (a liveness probe's patience is
seconds): before this change the same burst held `/health` for 2.7-8.8 s.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from .conftest import free_port
from .processes import start_server, wait_ready

BURST = 16
P99_BOUND_S = 0.1


def _big_png() -> str:
    """A 4096x4096 PNG that is small to send (80 KB) and costs a full 48 MB decode to check."""
    ramp = np.linspace(0, 255, 4096).astype(np.uint8)
    flat = np.full((4096, 4096), 90, np.uint8)
    pixels = np.stack([np.tile(ramp, (4096, 1)), np.tile(ramp[:, None], (1, 4096)), flat], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


@contextmanager
def _served(tmp_path: Path) -> Iterator[str]:
    """`refinery serve` in its own process (its GIL is not shared with this test's 17 client threads)."""
    port = free_port()
    process = start_server(tmp_path / "data", port, tmp_path / "server.log", preview_every="0")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextmanager
def _health_watch(url: str) -> Iterator[list[float]]:
    """Seconds each `GET /health` took, polled back to back while the block runs."""
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield latencies
    finally:
        stop.set()
        watcher.join()


def _p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99))


def _burst(send: Callable[[int], httpx.Response]) -> list[int]:
    with ThreadPoolExecutor(BURST) as pool:
        return [answer.status_code for answer in pool.map(send, range(BURST))]


def test_health_stays_fast_while_16_oversized_images_are_checked(tmp_path: Path) -> None:
    image = _big_png()
    native = json.dumps({"prompt": "a wall", "init_image": image, "width": 4096, "height": 4096}).encode()
    a1111 = json.dumps({"prompt": "a wall", "init_images": [image], "width": 4096, "height": 4096}).encode()
    headers = {"content-type": "application/json"}
    with _served(tmp_path) as url:

        def send(index: int) -> httpx.Response:  # half native, half A1111, all at once
            route, body = ("/v1/jobs", native) if index % 2 else ("/sdapi/v1/img2img", a1111)
            return httpx.post(f"{url}{route}", content=body, headers=headers, timeout=120)

        send(0)
        with _health_watch(url) as latencies:
            statuses = _burst(send)
        assert statuses == [422] * BURST  # each refused for its size, after its image was decoded and checked
        assert httpx.get(f"{url}/v1/jobs").json()["total"] == 0
    assert len(latencies) >= 20
    assert _p99(latencies) < P99_BOUND_S, sorted(latencies)[-5:]


def _large_new_checkpoint(models: Path, size: int) -> None:
    """A diffusers-folder checkpoint whose UNet weights are `size` bytes (sparse: cheap to make, read in full
    to hash)."""
    folder = models / "big"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with (folder / "unet" / "diffusion_pytorch_model.safetensors").open("wb") as weights:
        weights.truncate(size)


def test_health_stays_fast_while_a_large_new_checkpoint_is_hashed(tmp_path: Path) -> None:
    body = {"prompt": "a hill", "width": 64, "height": 64, "num_inference_steps": 2, "refiner_steps": 1}
    with _served(tmp_path) as url:
        _large_new_checkpoint(tmp_path / "data" / "models", 3 << 30)  # new since the start: its hash is not known
        with _health_watch(url) as latencies:
            native = httpx.post(f"{url}/v1/jobs", json={**body, "base_model": "big"}, timeout=120)
        listed = httpx.get(f"{url}/v1/checkpoints").json()
    assert native.status_code == 202, native.text
    assert [entry["name"] for entry in listed["checkpoints"]] == ["big"] and listed["checkpoints"][0]["hash"]
    assert len(latencies) >= 20
    assert _p99(latencies) < P99_BOUND_S, sorted(latencies)[-5:]
