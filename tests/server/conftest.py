"""A real uvicorn server on a loopback port, in a thread, over the session's tiny service."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sdxl_refinery import ImageService
from sdxl_refinery.config import Settings
from sdxl_refinery.server import create_app

SMALL_JOB = {"prompt": "a lighthouse", "width": 256, "height": 256, "num_inference_steps": 6, "refiner_steps": 3}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    def __init__(self, url: str, settings: Settings, app: Any) -> None:
        self.url = url
        self.settings = settings
        self.app = app
        self.client = httpx.Client(base_url=url, timeout=60)

    def wait_for(self, job_id: str, statuses: set[str], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in statuses:
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {statuses}")


@contextmanager
def run_server(service: ImageService, data_dir: Path, **overrides: Any) -> Iterator[RunningServer]:
    port = free_port()
    overrides.setdefault("max_steps", 500)  # long tiny jobs give tests time to watch and cancel them
    settings = Settings(data_dir=data_dir, port=port, base_model="tiny", refiner_model="tiny", **overrides)
    app = create_app(settings, service=service)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    running = RunningServer(f"http://127.0.0.1:{port}", settings, app)
    try:
        yield running
    finally:
        running.client.close()
        server.should_exit = True
        thread.join(timeout=30)


ServerFactory = Callable[..., Any]


@pytest.fixture
def server_factory(service: ImageService, tmp_path: Path) -> ServerFactory:
    """Start a server with settings overrides: `with server_factory(api_key="k") as server: ...`."""

    def factory(**overrides: Any) -> Any:
        return run_server(service, tmp_path / "data", **overrides)

    return factory


@pytest.fixture
def server(server_factory: ServerFactory) -> Iterator[RunningServer]:
    with server_factory() as running:
        yield running
