"""The worker survives a full or read-only data disk: /ready says so, submissions get 507/503, and it all
recovers by itself once the cause goes away (a real tmpfs mounted for the test; skipped where mounting is
not allowed)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..fakes import FakeEngine, fake_service
from ..waiting import patience, poll
from .conftest import RunningServer, run_server

SMALL = {"width": 256, "height": 256, "num_inference_steps": 4, "refiner_steps": 2}


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of its own, so the test can fill it or make it read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def disk_server(tmpfs: Path) -> Iterator[tuple[RunningServer, FakeEngine]]:
    service, engine = fake_service()
    with run_server(service, tmpfs / "data") as server:
        yield server, engine
    service.close()


def _fill(folder: Path) -> Path:
    """Write until the disk is full; the file is the space to give back."""
    filler = folder / "filler.bin"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
    return filler


def _ready(server: RunningServer) -> tuple[int, str | None]:
    answer = server.client.get("/ready")
    error: str | None = answer.json()["error"]
    return answer.status_code, error


def test_a_full_disk_during_a_run_pauses_then_everything_finishes(
    disk_server: tuple[RunningServer, FakeEngine], tmpfs: Path
) -> None:
    server, engine = disk_server
    engine.pause_at(1)
    first = server.client.post("/v1/jobs", json={"prompt": "a harbour", **SMALL}).json()["id"]
    assert engine.paused.wait(patience(60))
    filler = _fill(tmpfs)
    engine.resume()  # its PNG (and the database's writes) now meet a full disk
    poll(lambda: _ready(server)[0] == 503, "/ready to report the full disk")
    assert "full" in (_ready(server)[1] or "")
    refused = server.client.post("/v1/jobs", json={"prompt": "another", **SMALL})
    assert refused.status_code == 507 and refused.headers["Retry-After"]
    assert server.job(first)["status"] in ("queued", "running")  # never lost, never failed for the disk
    filler.unlink()  # the space comes back: the very next submission is taken (not a stale 507 for 15 s)
    at_once = server.client.post("/v1/jobs", json={"prompt": "right after", **SMALL})
    assert at_once.status_code == 202, at_once.text
    assert server.wait_for(first, {"succeeded"})["result"]["images"] == ["image.attempt2.png"]  # its second attempt
    assert server.wait_for(at_once.json()["id"], {"succeeded"})["status"] == "succeeded"
    poll(lambda: _ready(server)[0] == 200, "/ready to recover")
    second = server.client.post("/v1/jobs", json={"prompt": "the next one", **SMALL})
    assert second.status_code == 202
    assert server.wait_for(second.json()["id"], {"succeeded"})["status"] == "succeeded"


def test_a_read_only_database_pauses_then_recovers(server: RunningServer, fake_engine: FakeEngine) -> None:
    """SQLite refusing writes (its own read-only error, switched on in the live store): the job's outcome waits
    and is committed once writes work again. (A tmpfs cannot be remounted read-only while SQLite holds it.)"""
    store = server.app.state.refinery.store
    fake_engine.pause_at(1)
    first = server.client.post("/v1/jobs", json={"prompt": "a harbour", **SMALL}).json()["id"]
    assert fake_engine.paused.wait(patience(60))
    store._execute("PRAGMA query_only = ON")
    fake_engine.resume()
    poll(lambda: _ready(server)[0] == 503, "/ready to report the read-only database")
    assert "readonly database" in (_ready(server)[1] or "")
    refused = server.client.post("/v1/jobs", json={"prompt": "another", **SMALL})
    assert refused.status_code == 503 and "readonly" in refused.json()["detail"]
    store._execute("PRAGMA query_only = OFF")
    assert server.wait_for(first, {"succeeded"})["status"] == "succeeded"
    poll(lambda: _ready(server)[0] == 200, "/ready to recover")
    assert server.client.post("/v1/jobs", json={"prompt": "the next one", **SMALL}).status_code == 202


def test_damaged_database_pages_are_a_503_with_the_reason_everywhere(
    server: RunningServer, fake_engine: FakeEngine
) -> None:
    """Pages of the job database overwritten on disk (what a failing disk or a careless copy leaves): every
    route that needs the store answers 503 naming the damage, /ready says it, nothing is a bare 500."""
    import sqlite3

    ids = [server.client.post("/v1/jobs", json={"prompt": "x" * 2000 + str(i), **SMALL}).json()["id"] for i in range(8)]
    for job_id in ids:
        server.wait_for(job_id, {"succeeded"})
    path = server.app.state.refinery.store.path
    outside = sqlite3.connect(path)
    outside.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, none in the log
    page = outside.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as database:  # keep page 1 (the header and schema), overwrite every other page
        size = database.seek(0, 2)
        database.seek(page)
        database.write(b"\xa5" * (size - page))
    outside.execute("PRAGMA user_version = 99")  # a write elsewhere: the server's cached pages are dropped
    outside.close()

    listing = server.client.get("/v1/jobs")
    assert listing.status_code == 503 and "malformed" in listing.json()["detail"], listing.text
    submitted = server.client.post("/v1/jobs", json={"prompt": "after the damage", **SMALL})
    assert submitted.status_code == 503 and "malformed" in submitted.json()["detail"]
    assert submitted.headers["Retry-After"]
    poll(lambda: _ready(server)[0] == 503, "/ready to report the damage")
    assert "malformed" in (_ready(server)[1] or "")
    assert server.client.get("/health").status_code == 200  # the process lives: an operator can restore
