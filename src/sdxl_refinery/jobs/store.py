"""The JobStore interface: where accepted jobs live until they are done.

Two implementations: `SQLiteJobStore` (embedded, the default) and the Redis
store of the Celery backend. Every method is safe to call from any thread.
"""

from __future__ import annotations

import asyncio
import builtins
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .models import Job, JobProgress, JobRequest, JobStatus

if TYPE_CHECKING:
    from .events import JobEvents


class QueueFull(Exception):
    """The queue holds its maximum number of waiting and running jobs, or the owner's share of them."""

    def __init__(self, depth: int, retry_after: int, owner: str | None = None) -> None:
        self.depth = depth
        self.retry_after = retry_after
        self.owner = owner
        whose = f"key {owner!r} has its share of the queue" if owner else "the queue is full"
        super().__init__(f"{whose} ({depth} jobs queued or running); retry in {retry_after} s")


@dataclass(frozen=True)
class Owner:
    """Who submits a job (an API key's name) and how many of the queue's places their jobs may hold.

    Attributes:
        name: the key's name; jobs carry it, and only it (or an admin key) sees them.
        share: queued and running jobs this owner may hold at once (None: only the queue's own cap).
    """

    name: str
    share: int | None = None


class JobNotFound(KeyError):
    """No job has this id."""


class JobLost(Exception):
    """A worker's write about a job it no longer holds: its worker was taken for dead and the job given to
    another attempt. The write is refused; the worker drops the job (its images are the new attempt's to make)."""


@dataclass(frozen=True)
class Dedup:
    """When a new request is the same operation as an earlier job, and attaches to it instead of queueing.

    Attributes:
        fingerprint: who asked for what (a hash of the caller, and of the Idempotency-Key or the whole request).
        window_seconds: how far back an earlier job counts.
        unanswered_only: attach only to a job whose images no connected client has received yet (a retry
            after a timeout), so that asking again on purpose renders again; False for an explicit
            Idempotency-Key, which always means the same operation.
    """

    fingerprint: str
    window_seconds: float
    unanswered_only: bool

    def accepts(self, job: Job, now: float) -> bool:
        """Whether `job` is this operation's job: recent, not failed or cancelled, unanswered if required."""
        usable = job.status in (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)
        return usable and job.created >= now - self.window_seconds and not (self.unanswered_only and job.answered)


class JobStore(ABC):
    """Persistent jobs: create, start, report, finish, list, cancel.

    The embedded store also hands out work itself (`hands_out_work`: the app runs a
    worker on `claim_next` after `recover`); with Celery the broker does that, workers
    elsewhere call `start`, and their events reach this process through `relay_events`.
    """

    hands_out_work: bool = False
    """Whether this process claims and runs the jobs (embedded) or workers elsewhere do (Celery)."""

    @abstractmethod
    def claim_next(self, worker: str) -> Job | None:
        """Atomically take the oldest queued job for `worker` (None when none is queued, or work is brokered)."""

    @abstractmethod
    def recover(self, crash_limit: int = 3) -> builtins.list[str]:
        """At start: decide what becomes of jobs a dead process left running; returns their ids.

        A job that was running when a process died for the `crash_limit`-th time is failed ("crashed the
        worker N times") rather than run again: it may be what kills the process.
        """

    def durability_warnings(self) -> builtins.list[str]:
        """What in the store's own configuration would lose jobs (the Redis store reads Redis's; SQLite's WAL
        needs nothing set)."""
        return []

    @abstractmethod
    def workers(self) -> builtins.list[dict[str, Any]] | None:
        """Workers in other processes that reported lately, or None when this process's own worker runs the jobs."""

    async def relay_events(self, events: JobEvents, stop: asyncio.Event) -> None:  # noqa: B027
        """Forward other processes' live events to `events` until `stop`; in-process stores have none to relay."""

    @abstractmethod
    def create(self, request: JobRequest, client: str, max_depth: int | None = None, owner: Owner | None = None) -> Job:
        """Persist a new queued job (of `owner`, when given) before returning it.

        Raises:
            QueueFull: `max_depth` jobs are already queued or running, or `owner.share` of the owner's.
        """

    @abstractmethod
    def create_or_attach(
        self, request: JobRequest, client: str, max_depth: int | None, dedup: Dedup, owner: Owner | None = None
    ) -> tuple[Job, bool]:
        """The job `dedup` accepts if there is one (and True), else a new queued job (and False), atomically.

        Raises:
            QueueFull: a new job was needed and `max_depth` jobs are already queued or running, or
                `owner.share` of the owner's.
        """

    @abstractmethod
    def mark_answered(self, job_id: str) -> None:
        """A synchronous call delivered this finished job's images; later identical calls render anew."""

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """Raises: JobNotFound."""

    @abstractmethod
    def list(
        self, offset: int = 0, limit: int = 20, status: JobStatus | None = None, owner: str | None = None
    ) -> tuple[builtins.list[Job], int]:
        """Newest first (only `owner`'s jobs, when given); returns the page and the total count."""

    @abstractmethod
    def claim_partners(self, worker: str, key: str, room: int) -> builtins.list[Job]:
        """Atomically take queued jobs whose batch key (`batching.batch_key`) is `key` for `worker`, oldest
        first and each whole, while their images add up to at most `room`; stops at the first that does not
        fit, so that no later job overtakes it. Jobs of a run alone (no key) are never taken here."""

    @abstractmethod
    def mark_batch(self, job_ids: builtins.list[str], batch: dict[str, int] | None) -> None:
        """Record on each running job that it shares a pass: `{"jobs": k, "images": m}` (None: it runs alone)."""

    @abstractmethod
    def start(self, job_id: str, worker: str) -> Job | None:
        """Atomically mark a queued (or redelivered running) job as running for `worker`.

        Returns None when the job is already finished or cancelled: a redelivered
        task then does nothing, so no job runs twice to completion.
        """

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool:
        """Whether someone asked to cancel the job (checked by workers every step)."""

    @abstractmethod
    def interrupt_requested(self, job_id: str) -> bool:
        """Whether someone asked to interrupt the running job, keeping its image (checked by workers every step)."""

    @abstractmethod
    def update_progress(self, job_id: str, progress: JobProgress) -> None: ...

    @abstractmethod
    def succeed(self, job_id: str, result: dict[str, Any]) -> None: ...

    @abstractmethod
    def fail(self, job_id: str, error: str) -> None: ...

    @abstractmethod
    def mark_cancelled(self, job_id: str) -> None:
        """A running job stopped because it was cancelled."""

    @abstractmethod
    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job at once, or flag a running one; terminal jobs are left as they are.

        Raises:
            JobNotFound.
        """

    @abstractmethod
    def interrupt(self, job_id: str) -> Job:
        """Flag a running job to stop within one step and finish with its image as it stands (A1111's
        `/interrupt`); queued and finished jobs are left as they are.

        Raises:
            JobNotFound.
        """

    @abstractmethod
    def requeue(self, job_id: str) -> None:
        """Put a running job back at the head of the queue (a draining worker)."""

    @abstractmethod
    def position(self, job_id: str) -> int | None:
        """1-based place among queued jobs, or None when not queued."""

    @abstractmethod
    def depth(self) -> int:
        """Jobs queued or running."""

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Jobs per status."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""
