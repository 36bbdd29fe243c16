"""The job database's schema is versioned: a database written before versioning upgrades with everything intact."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from sdxl_refinery.jobs.models import JobStatus
from sdxl_refinery.jobs.sqlite_migrations import LATEST, MIGRATIONS, schema_version
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore
from sdxl_refinery.jobs.storage import FolderStorage

FIXTURE = Path(__file__).parent / "fixtures" / "schema-v0"  # made by make_schema_v0.py with the code of af35b5f


@pytest.fixture
def old_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    return data


V0_COLUMNS = ("seq, id, status, queue_order, request, client, created, started, finished, progress, result, error, "
              "attempts, cancel_requested, worker")  # fmt: skip


def _rows(path: Path, columns: str = V0_COLUMNS) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT {columns} FROM jobs ORDER BY seq").fetchall()


def test_a_pre_versioning_database_upgrades_with_every_job_and_image_intact(old_data: Path) -> None:
    database = old_data / "jobs.sqlite3"
    before = _rows(database)
    with sqlite3.connect(database) as db:
        assert schema_version(db) == 0
    store = SQLiteJobStore(database)
    try:
        # 1. Upgraded in order, to the latest version, with a backup of the old file beside it.
        assert store.migrations_applied == [m.version for m in MIGRATIONS]
        assert schema_version(store._db) == LATEST
        backup = old_data / "jobs.sqlite3.v0.bak"
        assert _rows(backup) == before
        with sqlite3.connect(backup) as db:
            assert schema_version(db) == 0
        # 2. Every job as it was, read through the store; the new columns hold their defaults.
        assert _rows(database) == before
        assert set(_rows(database, "fingerprint, answered")) == {(None, 0)}
        jobs, total = store.list(0, 100)
        assert total == 5
        by_status = {job.status: job for job in jobs}
        assert set(by_status) == set(JobStatus)
        done = by_status[JobStatus.SUCCEEDED]
        assert done.result is not None and done.result["images"] == ["image.png"]
        assert done.request.prompt == "fixture job 1" and done.request.seed == 1
        assert by_status[JobStatus.FAILED].error == "GenerationFailed: fixture"
        assert by_status[JobStatus.FAILED].request.mode.value == "handoff"
        assert by_status[JobStatus.RUNNING].progress.step == 2
        # 3. The image of the finished job is where its record says.
        assert FolderStorage(old_data / "images").read(done.id, "image.png").startswith(b"\x89PNG")
        # 4. The queue still works: recover the running job, then claim in order.
        assert store.recover() == [by_status[JobStatus.RUNNING].id]
        claimed = store.claim_next("w")
        assert claimed is not None and claimed.id == by_status[JobStatus.RUNNING].id
    finally:
        store.close()


def test_reopening_an_upgraded_database_applies_nothing(old_data: Path) -> None:
    SQLiteJobStore(old_data / "jobs.sqlite3").close()
    again = SQLiteJobStore(old_data / "jobs.sqlite3")
    assert again.migrations_applied == []
    again.close()


def test_a_new_database_starts_at_the_latest_version_without_a_backup(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    assert schema_version(store._db) == LATEST
    store.close()
    assert not list(tmp_path.glob("*.bak"))


def test_a_database_from_a_newer_refinery_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    SQLiteJobStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {LATEST + 1}")
    with pytest.raises(RuntimeError, match="newer than this Refinery knows"):
        SQLiteJobStore(path)
