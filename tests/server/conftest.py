"""A real uvicorn server on a loopback port, in a thread.

`server` / `server_factory` run over a fake engine (tests/fakes.py): their subject is
the server. `real_server_factory` runs over the session's tiny SDXL pair, for the
tests that check real images through the server end to end.
"""

from __future__ import annotations

import socket
import threading
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
from sdxl_refinery.server.connections import http_protocol

from ..fakes import FakeEngine, fake_service
from ..waiting import patience, poll

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

    def job(self, job_id: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.client.get(f"/v1/jobs/{job_id}").json()
        return answer

    def wait_for(self, job_id: str, statuses: set[str]) -> dict[str, Any]:
        """The job once its status is one of `statuses` (polled; the limit is only a safety net)."""

        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in statuses else None

        return poll(reached, f"job {job_id} to reach {statuses}")


@contextmanager
def run_server(service: ImageService, data_dir: Path, **overrides: Any) -> Iterator[RunningServer]:
    port = free_port()
    overrides.setdefault("max_steps", 500)  # long tiny jobs give tests time to watch and cancel them
    settings = Settings(data_dir=data_dir, port=port, base_model="tiny", refiner_model="tiny", **overrides)
    app = create_app(settings, service=service)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                                           http=http_protocol(settings.client_timeout_seconds)))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll(lambda: server.started or not thread.is_alive(), "uvicorn to start", interval=0.02)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    running = RunningServer(f"http://127.0.0.1:{port}", settings, app)
    try:
        yield running
    finally:
        running.client.close()
        server.should_exit = True
        thread.join(timeout=patience(60))


ServerFactory = Callable[..., Any]


@pytest.fixture
def fake() -> Iterator[tuple[ImageService, FakeEngine]]:
    """A service over a fake engine, fresh for each test."""
    service, engine = fake_service()
    yield service, engine
    engine.resume()
    service.close()


@pytest.fixture
def fake_engine(fake: tuple[ImageService, FakeEngine]) -> FakeEngine:
    return fake[1]


@pytest.fixture
def server_factory(fake: tuple[ImageService, FakeEngine], tmp_path: Path) -> ServerFactory:
    """Start a server over the fake engine with settings overrides: `with server_factory(api_key="k") as s: ...`."""

    def factory(**overrides: Any) -> Any:
        return run_server(fake[0], tmp_path / "data", **overrides)

    return factory


@pytest.fixture
def real_server_factory(service: ImageService, tmp_path: Path) -> ServerFactory:
    """Like `server_factory`, over the session's tiny SDXL pair: real images end to end."""

    def factory(**overrides: Any) -> Any:
        return run_server(service, tmp_path / "data", **overrides)

    return factory


@pytest.fixture
def server(server_factory: ServerFactory) -> Iterator[RunningServer]:
    with server_factory() as running:
        yield running
