"""Scale-out that heals in seconds (issue 27, item 1), with real redis-server and worker processes, default
settings (the broker's visibility timeout stays 2 h, so only the heartbeat bound, 15 s, can heal):
- the worker running a job is SIGKILLed: the job runs again on the other worker, once, and succeeds;
- the worker running a job is frozen (SIGSTOP) past the bound and resumed: the job ran on the other worker,
  and the frozen attempt, back, changes neither the record nor the images.
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..fakes import fake_service
from ..server.conftest import RunningServer, run_server
from ..waiting import patience, poll
from .redis_server import REDIS, redis_server
from .test_celery import Workers

pytestmark = pytest.mark.skipif(REDIS is None, reason="Debian's redis-server is not installed")
SLOW_JOB = {"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 80, "refiner_steps": 3, "n": 2}


@contextlib.contextmanager
def cluster(tmp_path: Path, tiny_pair: tuple[Path, Path], workers_and_arguments: dict[str, tuple[str, ...]],
            **options: str) -> Iterator[tuple[RunningServer, Workers]]:  # fmt: skip
    """A Redis, the named workers (with their command-line arguments) and one API server, stopped after."""
    service, _engine = fake_service()
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as (url, _process):
        workers = Workers(url, tmp_path / "shared", tmp_path, (str(tiny_pair[0]), str(tiny_pair[1])), **options)
        for name, arguments in workers_and_arguments.items():
            workers.start(name, *arguments)
        try:
            with run_server(service, tmp_path / "shared", backend="celery", redis_url=url) as server:
                yield server, workers
        finally:
            workers.stop_all()
            service.close()


def _reported(server: RunningServer, count: int) -> list[dict[str, Any]]:
    """The workers' reports, once `count` of them report."""

    def enough() -> list[dict[str, Any]] | None:
        reported: list[dict[str, Any]] = server.client.get("/v1/workers").json()["workers"]
        return reported if len(reported) >= count else None

    return poll(enough, f"{count} workers to report", interval=0.2)


@pytest.fixture
def healing(tmp_path: Path, tiny_pair: tuple[Path, Path]) -> Iterator[tuple[RunningServer, Workers]]:
    """A fresh cluster per test (each test kills or freezes a worker): one API server, two workers, and the
    broker's default visibility timeout (redelivery by the broker cannot heal in time)."""
    with cluster(tmp_path, tiny_pair, {"w1": (), "w2": ()}, visibility_timeout="7200") as (server, workers):
        _reported(server, 2)
        yield server, workers


def _slow_job_and_its_worker(server: RunningServer, seed: int) -> tuple[str, str]:
    """A slow job's id, and the worker running it once it is three steps in."""
    job_id: str = server.client.post("/v1/jobs", json={**SLOW_JOB, "seed": seed}).json()["id"]
    return job_id, _running_on(server, job_id)


def _running_on(server: RunningServer, job_id: str) -> str:
    job = poll(lambda: (j := server.job(job_id))["progress"]["step"] >= 3 and j, "the job to reach step 3")
    worker: str = job["worker"]
    return worker


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_a_sigkilled_workers_job_runs_again_on_the_other_within_the_bound(
    healing: tuple[RunningServer, Workers],
) -> None:
    server, workers = healing
    job_id, victim = _slow_job_and_its_worker(server, 5)
    workers.processes[victim].send_signal(signal.SIGKILL)
    workers.processes[victim].wait(timeout=patience(10))
    done = server.wait_for(job_id, {"succeeded", "failed"})
    assert done["status"] == "succeeded" and done["worker"] != victim and done["attempts"] == 2
    assert sorted(done["result"]["images"]) == ["image.attempt2-1.png", "image.attempt2-2.png"]
    assert sorted(_digests(workers.data_dir / "images" / job_id)) == sorted(done["result"]["images"])


def test_a_frozen_worker_that_comes_back_does_not_overwrite_the_new_attempt(
    healing: tuple[RunningServer, Workers],
) -> None:
    server, workers = healing
    job_id, victim = _slow_job_and_its_worker(server, 6)
    workers.processes[victim].send_signal(signal.SIGSTOP)
    try:
        done = server.wait_for(job_id, {"succeeded", "failed"})
    finally:
        workers.processes[victim].send_signal(signal.SIGCONT)
    assert done["status"] == "succeeded" and done["worker"] != victim and done["attempts"] == 2
    folder = workers.data_dir / "images" / job_id
    images = _digests(folder)
    log = workers.logs / f"{victim}.log"
    poll(lambda: "this attempt's outcome is dropped" in log.read_text(errors="replace"),
         "the frozen attempt to give the job up")  # fmt: skip
    after = server.job(job_id)
    assert {key: after[key] for key in ("status", "worker", "attempts", "result", "finished")} == {
        key: done[key] for key in ("status", "worker", "attempts", "result", "finished")}  # fmt: skip
    assert _digests(folder) == images and sorted(images) == sorted(done["result"]["images"])


def test_two_workers_with_explicit_devices_share_one_host(tmp_path: Path, tiny_pair: tuple[Path, Path]) -> None:
    """Issue 27, item 3: `refinery worker --device cpu` twice on one host (as `--device cuda:0` and `cuda:1` on a
    two-card machine): distinct default names, both report their device, jobs go to both; a third worker
    given a live worker's name is refused."""
    with cluster(tmp_path, tiny_pair, {"first": ("--device", "cpu"), "second": ("--device", "cpu")}) as (
        server, workers,
    ):  # fmt: skip
        listed = _reported(server, 2)
        assert [worker["device"] for worker in listed] == ["cpu", "cpu"]
        names = [worker["name"] for worker in listed]
        assert len(set(names)) == 2 and all("-cpu-" in name for name in names), names
        jobs = [server.client.post("/v1/jobs", json={**SLOW_JOB, "n": 1, "seed": i}).json()["id"] for i in range(4)]
        ran_on = {server.wait_for(job_id, {"succeeded"})["worker"] for job_id in jobs}
        assert ran_on == set(names)
        assert "Redis runs without its append-only file" in (tmp_path / "first.log").read_text()
        workers.start("twin", "--device", "cpu", "--name", names[0])
        assert workers.processes["twin"].wait(timeout=patience(120)) == 1
        assert f"a live worker is already named {names[0]!r}" in (tmp_path / "twin.log").read_text()
