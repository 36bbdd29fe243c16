"""Storage and process faults: a full disk, an unwritable data folder, SIGTERM while a job runs."""

from __future__ import annotations

import errno
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sdxl_refinery import ImageService
from sdxl_refinery.jobs.models import JobStatus
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore

from ..fakes import FakeEngine
from ..waiting import patience, poll
from .conftest import SMALL_JOB, ServerFactory, free_port, run_server
from .processes import start_server, wait_ready
from .test_durability import _wait_for_step, _wait_succeeded


def test_a_full_disk_sends_the_job_back_to_the_queue_until_there_is_room(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    with server_factory() as server:
        real_fsync = os.fsync

        def full_disk(descriptor: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full_disk)
        job_id = server.client.post("/v1/jobs", json=SMALL_JOB).json()["id"]
        poll(lambda: server.client.get("/ready").status_code == 503, "/ready to report the full disk")
        assert "No space left on device" in server.client.get("/ready").json()["error"]
        assert server.job(job_id)["status"] in ("queued", "running")  # not failed: the disk is not the job's fault
        folder = server.settings.data_dir / "images" / job_id
        assert not folder.exists() or list(folder.iterdir()) == []  # no PNG, no temporary file
        monkeypatch.setattr(os, "fsync", real_fsync)
        done = server.wait_for(job_id, {"succeeded", "failed"})
        assert done["status"] == "succeeded" and done["attempts"] >= 2
        next_job = server.client.post("/v1/jobs", json=SMALL_JOB).json()["id"]
        assert server.wait_for(next_job, {"succeeded", "failed"})["status"] == "succeeded"
        assert server.client.get("/v1/jobs").json()["total"] == 2  # the database is intact


def test_unwritable_data_folder_is_a_clear_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_refinery", "serve", "--data-dir", str(blocker / "data"), "--port",
         str(free_port())], capture_output=True, text=True, timeout=patience(120),
        env={**os.environ, "REFINERY_BASE_MODEL": "tiny", "REFINERY_REFINER_MODEL": "tiny"},
    )  # fmt: skip
    assert done.returncode == 1
    assert "is not writable" in " ".join(done.stderr.split()) and str(blocker) in done.stderr.replace("\n", "")


def test_sigterm_requeues_the_running_job_and_a_restart_finishes_it(tmp_path: Path) -> None:
    data, port, log = tmp_path / "data", free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    process = start_server(data, port, log)
    try:
        wait_ready(url, process)
        job_id = httpx.post(url + "/v1/jobs", json={**SMALL_JOB, "num_inference_steps": 60}).json()["id"]
        _wait_for_step(url, job_id, 3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=patience(60)) in (
            0,
            -signal.SIGTERM,
        )  # uvicorn re-raises the signal after shutting down
        with sqlite3.connect(data / "jobs.sqlite3") as db:
            assert db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone() == ("queued",)
        process = start_server(data, port, log)
        wait_ready(url, process)
        job = _wait_succeeded(url, job_id)
        assert job["attempts"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=patience(60))


def test_a_step_longer_than_the_shutdown_grace_sends_its_job_back_at_once(
    fake: tuple[ImageService, FakeEngine], tmp_path: Path
) -> None:
    service, engine = fake
    engine.pause_at(1, stubborn=True)  # a step that ignores the stop until it ends, as a long CPU step does
    try:
        with run_server(service, tmp_path / "data", shutdown_grace_seconds=0.5) as server:
            job_id = server.client.post("/v1/jobs", json=SMALL_JOB).json()["id"]
            assert engine.paused.wait(patience(60))
        # The server has shut down while the step still runs: the job is already back in the queue.
        store = SQLiteJobStore(tmp_path / "data" / "jobs.sqlite3")
        assert store.get(job_id).status is JobStatus.QUEUED
        store.close()
    finally:
        engine.resume()
