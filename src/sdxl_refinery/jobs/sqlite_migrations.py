"""The SQLite job database's schema, as ordered migrations tracked by `PRAGMA user_version`.

At start the store applies every migration newer than the file's version, in
order, each in its own transaction. Before touching a database that holds data,
it copies the file aside (`jobs.sqlite3.v<old>.bak`, SQLite's online backup), so
a failed or unwanted upgrade can be undone by putting the copy back.

To change the schema: append a `Migration` with the next version; never edit one
that has shipped. Version 0 is a database made before versioning (same tables as
version 1), so migration 1 is written to be a no-op on it.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One step of the schema: `apply` takes the database from `version - 1` to `version`."""

    version: int
    description: str
    apply: Callable[[sqlite3.Connection], None]


def _jobs_table(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE IF NOT EXISTS jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL,
            queue_order REAL NOT NULL,
            request TEXT NOT NULL,
            client TEXT,
            created REAL NOT NULL,
            started REAL,
            finished REAL,
            progress TEXT,
            result TEXT,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            worker TEXT
        )""")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, queue_order)")


def _listing_index(db: sqlite3.Connection) -> None:
    # Listing one status newest first (the gallery, GET /v1/jobs?status=...) reads this index instead of the table.
    db.execute("CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq)")


def _retry_attachment(db: sqlite3.Connection) -> None:
    # A retried or idempotent request finds its earlier job by fingerprint (store.Dedup).
    db.execute("ALTER TABLE jobs ADD COLUMN fingerprint TEXT")
    db.execute("ALTER TABLE jobs ADD COLUMN answered INTEGER NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_fingerprint ON jobs (fingerprint, seq)")


def _interrupt_flag(db: sqlite3.Connection) -> None:
    # A1111's /interrupt stops a job and keeps its image: a flag apart from cancel, which discards it.
    db.execute("ALTER TABLE jobs ADD COLUMN interrupt_requested INTEGER NOT NULL DEFAULT 0")


def _crash_count(db: sqlite3.Connection) -> None:
    # How many dead processes left the job running: at the crash limit it is failed, not run again.
    db.execute("ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0")


def _batching(db: sqlite3.Connection) -> None:
    # Workers take queued jobs of the same batch key (batching.batch_key) into one pass, and say so per job.
    db.execute("ALTER TABLE jobs ADD COLUMN batch_key TEXT")
    db.execute("ALTER TABLE jobs ADD COLUMN batch TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_batch_key ON jobs (status, batch_key, queue_order)")


def _owners(db: sqlite3.Connection) -> None:
    # Each job belongs to the API key that submitted it: it lists, and counts against, that key's share alone.
    db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq)")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "jobs table and queue index", _jobs_table),
    Migration(2, "index for listing jobs of one status newest first", _listing_index),
    Migration(3, "fingerprint and answered flag, so that retries attach to their job", _retry_attachment),
    Migration(4, "interrupt flag: stop a running job and keep its image", _interrupt_flag),
    Migration(5, "crash count, so that a job that kills its worker is not run forever", _crash_count),
    Migration(6, "batch key and batch of each job, so that compatible jobs share a pass", _batching),
    Migration(7, "owner of each job: the API key that submitted it", _owners),
)
LATEST = MIGRATIONS[-1].version


def schema_version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("PRAGMA user_version").fetchone()
    return int(version)


def _holds_data(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is not None


def _backup(db: sqlite3.Connection, path: Path, version: int) -> Path:
    target = path.with_name(f"{path.name}.v{version}.bak")
    with sqlite3.connect(target) as copy:
        db.backup(copy)
    copy.close()
    return target


def migrate(db: sqlite3.Connection, path: Path) -> list[int]:
    """Bring the database at `path` (open as `db`, autocommit) to `LATEST`; returns the versions applied.

    Raises:
        RuntimeError: the file's schema is newer than this code knows (a downgrade would lose data).
        sqlite3.Error: a migration failed; its transaction is rolled back and the backup is beside the file.
    """
    current = schema_version(db)
    if current > LATEST:
        raise RuntimeError(f"{path}: schema version {current} is newer than this Refinery knows ({LATEST}); upgrade it")
    pending = [migration for migration in MIGRATIONS if migration.version > current]
    if not pending:
        return []
    if _holds_data(db):
        log.info("Backed up %s to %s before upgrading its schema", path, _backup(db, path, current))
    for migration in pending:
        db.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(db)
            db.execute(f"PRAGMA user_version = {migration.version:d}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        log.info("Job database schema: applied %d (%s)", migration.version, migration.description)
    return [migration.version for migration in pending]
