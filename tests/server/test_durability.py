"""SIGKILL the server mid-job, restart it: every accepted job completes once, with no duplicate images."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..waiting import patience, poll
from .conftest import free_port
from .processes import start_server, wait_ready


def _job(url: str, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}").json()
    return answer


def _wait_for_step(url: str, job_id: str, step: int) -> None:
    poll(lambda: _job(url, job_id)["progress"]["step"] >= step, f"job {job_id} to reach step {step}")


def _wait_succeeded(url: str, job_id: str) -> dict[str, Any]:
    def succeeded() -> dict[str, Any] | None:
        job = _job(url, job_id)
        assert job["status"] in ("queued", "running", "succeeded"), job
        return job if job["status"] == "succeeded" else None

    return poll(succeeded, f"job {job_id} to succeed", interval=0.1)


def _kill_mid_run_and_restart(
    tmp_path: Path,
    bodies: list[dict[str, Any]],
    before_kill: Callable[[str, list[str]], None] | None = None,
    **settings: str,
) -> tuple[Path, list[str], list[dict[str, Any]]]:
    """Submit `bodies`, SIGKILL the server once the first job reached step 3 (after `before_kill(url, jobs)`),
    start it again on the same data and wait for every job to succeed: the data folder, ids and finished jobs."""
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    process = start_server(data, port, log, **settings)
    try:
        wait_ready(url, process)
        jobs = [httpx.post(url + "/v1/jobs", json=body).json()["id"] for body in bodies]
        _wait_for_step(url, jobs[0], 3)
        if before_kill is not None:
            before_kill(url, jobs)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=patience(30))

        process = start_server(data, port, log, **settings)
        wait_ready(url, process)
        finished = [_wait_succeeded(url, job_id) for job_id in jobs]
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=patience(60))
    return data, jobs, finished


def _assert_own_images_only(data: Path, jobs: list[str], finished: list[dict[str, Any]]) -> None:
    for job in finished:
        folder = data / "images" / job["id"]
        assert sorted(path.name for path in folder.iterdir()) == sorted(job["result"]["images"])
        assert len(job["result"]["images"]) == 2
    assert sorted(path.name for path in (data / "images").iterdir() if path.is_dir()) == sorted(jobs)


def test_sigkill_mid_job_then_restart_completes_every_job_once(tmp_path: Path) -> None:
    bodies = [{"prompt": f"job {i}", "width": 256, "height": 256, "num_inference_steps": 40, "refiner_steps": 3,
               "n": 2, "seed": 10 * i} for i in range(3)]  # fmt: skip
    data, jobs, finished = _kill_mid_run_and_restart(tmp_path, bodies)
    assert finished[0]["attempts"] == 2  # the job that was running ran again from the start
    assert [job["attempts"] for job in finished[1:]] == [1, 1]
    _assert_own_images_only(data, jobs, finished)


def test_sigkill_mid_batch_then_restart_finishes_every_job_of_the_batch_once(tmp_path: Path) -> None:
    """Three jobs share one pass (6 images); the server dies mid-pass; after the restart each job ran again
    once (its crash counted on its own), none is duplicated, and each has exactly its own images."""
    bodies = [{"prompt": f"batch job {i}", "width": 128, "height": 128, "num_inference_steps": 60,
               "refiner_steps": 3, "n": 2, "seed": 7 * i} for i in range(3)]  # fmt: skip

    def shares_one_pass(url: str, jobs: list[str]) -> None:
        assert [_job(url, job_id)["batch"] for job_id in jobs] == [{"jobs": 3, "images": 6}] * 3

    data, jobs, finished = _kill_mid_run_and_restart(tmp_path, bodies, shares_one_pass, max_batch="6",
                                                     batch_window_ms="5000")  # fmt: skip
    assert [job["attempts"] for job in finished] == [2, 2, 2]
    for index, job in enumerate(finished):
        assert job["result"]["seeds"] == [7 * index, 7 * index + 1]
    _assert_own_images_only(data, jobs, finished)


def test_a_job_that_kills_its_server_three_times_ends_failed(tmp_path: Path) -> None:
    """SIGKILL while the same job runs, three times: the third restart fails it instead of running it again."""
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    process = start_server(data, port, log)
    try:
        wait_ready(url, process)
        body = {"prompt": "the fatal one", "width": 256, "height": 256, "num_inference_steps": 400}
        job_id = httpx.post(url + "/v1/jobs", json=body).json()["id"]
        for crash in range(3):
            _wait_for_step(url, job_id, 2)
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=patience(30))
            process = start_server(data, port, log)
            wait_ready(url, process)
            if crash < 2:
                assert _job(url, job_id)["status"] in ("queued", "running")
        job = _job(url, job_id)
        assert job["status"] == "failed" and "crashed the worker 3 times" in job["error"]
        after = httpx.post(url + "/v1/jobs", json={**body, "num_inference_steps": 3, "refiner_steps": 2}).json()["id"]
        assert _wait_succeeded(url, after)["status"] == "succeeded"  # the server goes on with the queue
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=patience(60))
