"""A Celery worker process: one device, models loaded once, jobs run through the shared `Worker`.

The task is idempotent: `JobStore.start` refuses finished or cancelled jobs, and
image names are fixed per job, so a redelivery overwrites, never duplicates.
Cancellation is a Redis flag the worker reads every step, not `revoke(terminate=True)`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any

import redis
from kombu.exceptions import OperationalError

from ..config import Settings
from ..errors import RefineryError, StoreUnavailable
from ..service import ImageService
from .celery_app import HEARTBEAT_SECONDS, PREFIX, QUEUE, TASK_NAME, make_celery
from .celery_events import RedisEventSink
from .celery_store import CeleryJobStore
from .storage import FolderStorage
from .worker import Worker

log = logging.getLogger(__name__)


class RunningElsewhere(Exception):
    """The job is running on another live worker (a redelivery that came too early)."""


class WorkerRuntime:
    """One worker process: its service (models loaded once, kept warm), store, events and heartbeat."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.store = CeleryJobStore(settings)
        self.service = ImageService.from_settings(settings)
        self.sink = RedisEventSink(self.store.redis)
        self.worker = Worker(self.store, self.service, FolderStorage(settings.data_dir / "images"), self.sink,
                             preview_every=settings.preview_every, name=name, poll_cancel=True,
                             max_batch=settings.max_batch, batch_window=settings.batch_window_seconds)  # fmt: skip
        self._stop = threading.Event()

    def run_job(self, job_id: str) -> str:
        """The task body: start the job unless it is finished, cancelled or alive elsewhere; run it; record it.

        Every store call waits out a Redis outage (retried with backoff, as in `Worker.stored`), so a job
        is never left `running` because Redis blinked; the message is acknowledged only after.

        Raises:
            RunningElsewhere: another live worker holds it; the task is retried later.
        """
        return asyncio.run(self._run_job(job_id))

    async def _run_job(self, job_id: str) -> str:
        stored = self.worker.stored
        current = await stored(self.store.get, job_id)
        if current.status.value == "running" and current.worker not in (None, self.name):
            dead_after = self.settings.worker_dead_after_seconds
            alive = {worker["name"] for worker in await stored(self.store.workers, dead_after)}
            if current.worker in alive:
                raise RunningElsewhere(f"job {job_id} is running on {current.worker}")
        job = await stored(self.store.start, job_id, self.name)
        if job is None:
            log.info("Job %s is already finished or cancelled; nothing to do", job_id)
            return "skipped"
        if await stored(self.store.cancel_requested, job_id):
            await stored(self.store.mark_cancelled, job_id)
            self.sink.publish(job_id, "done", {"status": "cancelled", "error": "cancelled by request"})
            return "cancelled"
        self._try_beat()
        jobs = await self.worker.gather(job)  # partners' own tasks find them running here, then finished
        self._try_beat()
        await self.worker.process_batch(jobs)
        self._try_beat()
        finished: str = (await stored(self.store.get, job_id)).status.value
        return finished

    def _try_beat(self) -> None:
        try:
            self._beat()
        except redis.RedisError as error:
            log.warning("Heartbeat to Redis failed: %s", error)

    def _beat(self) -> None:
        described = self.service.describe()
        record = {"name": self.name, "host": socket.gethostname(), "device": described.get("device"),
                  "precision": described.get("precision"), "loaded": self.service.loaded,
                  "current_job": next(iter(self.worker.current), None), "current_jobs": list(self.worker.current),
                  "seen": time.time()}  # fmt: skip
        self.store.redis.hset(f"{PREFIX}workers", self.name, json.dumps(record))

    def _try_reap(self) -> None:
        """Take back the jobs of workers silent for `worker_dead_after_seconds` (this one's own beat just ran)."""
        try:
            self.store.reap(self.settings.worker_dead_after_seconds, self.settings.crash_limit)
        except (redis.RedisError, StoreUnavailable, OperationalError) as error:
            log.warning("Could not look for the jobs of dead workers: %s", error)

    def start_heartbeat(self) -> None:
        """Beat every `HEARTBEAT_SECONDS` from a thread of its own (a long step never delays it), and take back
        dead workers' jobs after each beat."""

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                self._try_beat()
                self._try_reap()

        self._beat()
        self._try_reap()
        threading.Thread(target=beat, name="refinery-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.store.redis.hdel(f"{PREFIX}workers", self.name)
        except redis.RedisError as error:  # its record goes stale and drops out of listings by itself
            log.warning("Could not remove this worker's record from Redis: %s", error)


def run_worker(settings: Settings, name: str) -> None:
    """Load the models, then consume jobs until stopped (SIGTERM finishes the running job first).

    Raises:
        RefineryError: a live worker already has this name.
        ModelLoadError: the models cannot be loaded.
    """
    runtime = WorkerRuntime(settings, name)
    if any(worker["name"] == name for worker in runtime.store.workers(settings.worker_dead_after_seconds)):
        raise RefineryError(f"a live worker is already named {name!r}: give this one another --name (names tell "
                            "workers apart, and a dead worker's jobs are found by its name)")  # fmt: skip
    for warning in runtime.store.durability_warnings():
        log.warning("%s (docs/scale-out.md)", warning)
    asyncio.run(runtime.service.load())
    app = make_celery(settings)

    @app.task(  # type: ignore[untyped-decorator]  # celery ships no type hints
        name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
    )
    def run_job(task: Any, job_id: str) -> str:
        try:
            return runtime.run_job(job_id)
        except RunningElsewhere as error:
            raise task.retry(countdown=settings.worker_dead_after_seconds, exc=error) from error

    runtime.start_heartbeat()
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1", "--without-gossip",
                         "--without-mingle", "--without-heartbeat", "-Q", QUEUE, "-n", f"{name}@%h",
                         "--loglevel=INFO"])  # fmt: skip
    finally:
        runtime.stop()
