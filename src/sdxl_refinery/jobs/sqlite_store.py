"""SQLite job store (WAL): the embedded default, durable across crashes.

A job is committed (synchronous=FULL) before `create` returns, so a 202 answer
always means the job survives a SIGKILL. Claiming is one UPDATE ... RETURNING
on the oldest queued row, so two workers never take the same job.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..batching import batch_key
from ..errors import StoreUnavailable, is_disk_full
from .models import Job, JobProgress, JobRequest, JobStatus, request_from_record
from .sqlite_migrations import migrate
from .store import Dedup, JobNotFound, JobStore, Owner, QueueFull

_ACTIVE = ("queued", "running")


class SQLiteJobStore(JobStore):
    """Jobs in one SQLite file.

    Args:
        path: the database file; its folder is created.

    Raises:
        sqlite3.Error / OSError: the file cannot be opened or created.
        RuntimeError: the file was written by a newer Refinery (see sqlite_migrations.py).
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self.migrations_applied = migrate(self._db, path)

    # -- helpers -------------------------------------------------------------------------------

    def _execute(self, sql: str, *args: Any) -> builtins.list[sqlite3.Row]:
        with self._lock, self._guarded():
            return self._db.execute(sql, args).fetchall()

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """SQLite's errors as `StoreUnavailable`: a full disk, a read-only file, damaged pages."""
        try:
            yield
        except sqlite3.Error as error:
            raise StoreUnavailable(f"job database {self.path}: {error}", disk_full=is_disk_full(error)) from error

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        progress = json.loads(row["progress"]) if row["progress"] else {}
        return Job(
            id=row["id"],
            request=request_from_record(json.loads(row["request"])),
            status=JobStatus(row["status"]),
            created=row["created"],
            started=row["started"],
            finished=row["finished"],
            progress=JobProgress(**progress),
            result=json.loads(row["result"]) if row["result"] else None,
            error=row["error"],
            attempts=row["attempts"],
            cancel_requested=bool(row["cancel_requested"]),
            interrupt_requested=bool(row["interrupt_requested"]),
            worker=row["worker"],
            client=row["client"],
            owner=row["owner"],
            fingerprint=row["fingerprint"],
            answered=bool(row["answered"]),
            batch=json.loads(row["batch"]) if row["batch"] else None,
        )

    # -- JobStore ------------------------------------------------------------------------------

    def create(self, request: JobRequest, client: str, max_depth: int | None = None, owner: Owner | None = None) -> Job:
        return self._create(request, client, max_depth, None, owner)[0]

    def create_or_attach(
        self, request: JobRequest, client: str, max_depth: int | None, dedup: Dedup, owner: Owner | None = None
    ) -> tuple[Job, bool]:
        return self._create(request, client, max_depth, dedup, owner)

    def _create(
        self, request: JobRequest, client: str, max_depth: int | None, dedup: Dedup | None,
        owner: Owner | None,
    ) -> tuple[Job, bool]:  # fmt: skip
        """One transaction: find the job `dedup` accepts, or check the depths and insert a new one."""
        job = Job(id=Job.new_id(), request=request, client=client, fingerprint=dedup.fingerprint if dedup else None,
                  owner=owner.name if owner else None)  # fmt: skip
        with self._lock, self._guarded():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if dedup is not None:
                    rows = self._db.execute("SELECT * FROM jobs WHERE fingerprint = ? ORDER BY seq DESC LIMIT 1",
                                            (dedup.fingerprint,)).fetchall()  # fmt: skip
                    earlier = self._job(rows[0]) if rows else None
                    if earlier is not None and dedup.accepts(earlier, job.created):
                        self._db.execute("COMMIT")
                        return earlier, True
                if max_depth is not None:
                    (depth,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", _ACTIVE).fetchone()
                    if depth >= max_depth:
                        raise QueueFull(depth, retry_after=30)
                if owner is not None and owner.share is not None:
                    (held,) = self._db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                                               (owner.name, *_ACTIVE)).fetchone()  # fmt: skip
                    if held >= owner.share:
                        raise QueueFull(held, retry_after=30, owner=owner.name)
                self._db.execute(
                    "INSERT INTO jobs (id, status, queue_order, request, client, created, fingerprint, batch_key, "
                    "owner) VALUES (?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?, ?, ?, ?, ?, ?)",
                    (job.id, job.status.value, request.model_dump_json(), client, job.created, job.fingerprint,
                     batch_key(request), job.owner),
                )  # fmt: skip
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return job, False

    def mark_answered(self, job_id: str) -> None:
        self._execute("UPDATE jobs SET answered = 1 WHERE id = ?", job_id)

    def get(self, job_id: str) -> Job:
        rows = self._execute("SELECT * FROM jobs WHERE id = ?", job_id)
        if not rows:
            raise JobNotFound(job_id)
        return self._job(rows[0])

    def list(
        self, offset: int = 0, limit: int = 20, status: JobStatus | None = None, owner: str | None = None
    ) -> tuple[builtins.list[Job], int]:
        conditions = [(condition, value) for condition, value in (("status = ?", status.value if status else None),
                      ("owner = ?", owner)) if value is not None]  # fmt: skip
        where = ("WHERE " + " AND ".join(condition for condition, _ in conditions)) if conditions else ""
        args = [value for _, value in conditions]
        rows = self._execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?", *args, limit, offset)
        (total,) = self._execute(f"SELECT COUNT(*) FROM jobs {where}", *args)[0]
        return [self._job(row) for row in rows], total

    hands_out_work = True

    def workers(self) -> builtins.list[dict[str, Any]] | None:
        return None  # the app's own worker runs every job

    def claim_next(self, worker: str) -> Job | None:
        """Atomically move the oldest queued job to running for `worker`."""
        rows = self._execute(
            "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, worker = ?, progress = NULL, "
            "batch = NULL WHERE id = (SELECT id FROM jobs WHERE status = 'queued' ORDER BY queue_order LIMIT 1) "
            "RETURNING *",
            time.time(),
            worker,
        )
        return self._job(rows[0]) if rows else None

    def claim_partners(self, worker: str, key: str, room: int) -> builtins.list[Job]:
        """Atomically move queued jobs of batch key `key` to running for `worker`, oldest first, each whole,
        while their images fit in `room`."""
        claimed: builtins.list[Job] = []
        with self._lock, self._guarded():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                candidates = self._db.execute(
                    "SELECT id, json_extract(request, '$.n') AS n FROM jobs WHERE status = 'queued' AND batch_key = ? "
                    "ORDER BY queue_order LIMIT ?", (key, room),
                ).fetchall()  # fmt: skip
                for candidate in candidates:
                    if candidate["n"] > room:
                        break  # the next in line does not fit: later ones must not overtake it
                    room -= candidate["n"]
                    rows = self._db.execute(
                        "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, worker = ?, "
                        "progress = NULL WHERE id = ? AND status = 'queued' RETURNING *",
                        (time.time(), worker, candidate["id"]),
                    ).fetchall()  # fmt: skip
                    claimed += [self._job(row) for row in rows]
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        return claimed

    def mark_batch(self, job_ids: builtins.list[str], batch: dict[str, int] | None) -> None:
        for job_id in job_ids:
            self._execute("UPDATE jobs SET batch = ? WHERE id = ?", json.dumps(batch) if batch else None, job_id)

    def start(self, job_id: str, worker: str) -> Job | None:
        rows = self._execute(
            "UPDATE jobs SET status = 'running', started = ?, attempts = attempts + 1, worker = ?, progress = NULL "
            "WHERE id = ? AND status IN ('queued', 'running') RETURNING *", time.time(), worker, job_id,
        )  # fmt: skip
        return self._job(rows[0]) if rows else None

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._execute("SELECT cancel_requested FROM jobs WHERE id = ?", job_id)
        return bool(rows and rows[0][0])

    def interrupt_requested(self, job_id: str) -> bool:
        rows = self._execute("SELECT interrupt_requested FROM jobs WHERE id = ?", job_id)
        return bool(rows and rows[0][0])

    def update_progress(self, job_id: str, progress: JobProgress) -> None:
        self._execute(
            "UPDATE jobs SET progress = ? WHERE id = ? AND status = 'running'", json.dumps(progress.__dict__), job_id
        )

    def succeed(self, job_id: str, result: dict[str, Any]) -> None:
        self._finish(job_id, JobStatus.SUCCEEDED, result=json.dumps(result))

    def fail(self, job_id: str, error: str) -> None:
        self._finish(job_id, JobStatus.FAILED, error=error)

    def mark_cancelled(self, job_id: str) -> None:
        self._finish(job_id, JobStatus.CANCELLED, error="cancelled by request")

    def _finish(self, job_id: str, status: JobStatus, result: str | None = None, error: str | None = None) -> None:
        self._execute(
            "UPDATE jobs SET status = ?, finished = ?, result = ?, error = ? WHERE id = ? AND status = 'running'",
            status.value, time.time(), result, error, job_id,
        )  # fmt: skip

    def cancel(self, job_id: str) -> Job:
        now = time.time()
        self._execute(
            "UPDATE jobs SET status = 'cancelled', finished = ?, error = 'cancelled by request', cancel_requested = 1 "
            "WHERE id = ? AND status = 'queued'", now, job_id,
        )  # fmt: skip
        self._execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", job_id)
        return self.get(job_id)

    def interrupt(self, job_id: str) -> Job:
        self._execute("UPDATE jobs SET interrupt_requested = 1 WHERE id = ? AND status = 'running'", job_id)
        return self.get(job_id)

    def _head_of_queue(self) -> float:
        (lowest,) = self._execute("SELECT COALESCE(MIN(queue_order), 1) FROM jobs WHERE status = 'queued'")[0]
        return float(lowest) - 1

    def requeue(self, job_id: str) -> None:
        self._execute(
            "UPDATE jobs SET status = 'queued', queue_order = ?, progress = NULL, worker = NULL, batch = NULL "
            "WHERE id = ? AND status = 'running'", self._head_of_queue(), job_id,
        )  # fmt: skip

    def recover(self, crash_limit: int = 3) -> builtins.list[str]:
        """At start: jobs left running by a dead process go back to the head of the queue; to cancelled if
        a cancel or an interrupt was asked (a partial image died with the process); to failed at the
        `crash_limit`-th crash. Returns their ids."""
        rows = self._execute("UPDATE jobs SET crashes = crashes + 1 WHERE status = 'running' "
                             "RETURNING id, queue_order, crashes, cancel_requested, interrupt_requested")  # fmt: skip
        for row in sorted(rows, key=lambda row: row["queue_order"], reverse=True):
            if row["cancel_requested"] or row["interrupt_requested"]:
                self.mark_cancelled(row["id"])
            elif row["crashes"] >= crash_limit:
                self.fail(
                    row["id"],
                    f"crashed the worker {row['crashes']} times; not run again (a process died "
                    f"while running it each time; the limit is REFINERY_CRASH_LIMIT={crash_limit})",
                )
            else:
                self.requeue(row["id"])
        return [row["id"] for row in sorted(rows, key=lambda row: row["queue_order"])]

    def position(self, job_id: str) -> int | None:
        rows = self._execute(
            "SELECT (SELECT COUNT(*) FROM jobs q WHERE q.status = 'queued' AND q.queue_order <= j.queue_order) "
            "FROM jobs j WHERE j.id = ? AND j.status = 'queued'", job_id,
        )  # fmt: skip
        return int(rows[0][0]) if rows else None

    def depth(self) -> int:
        return int(self._execute("SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", *_ACTIVE)[0][0])

    def counts(self) -> dict[str, int]:
        found = {row[0]: row[1] for row in self._execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")}
        return {status.value: int(found.get(status.value, 0)) for status in JobStatus}

    def close(self) -> None:
        with self._lock:
            self._db.close()
