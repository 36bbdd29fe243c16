"""Scale-out on Celery + Redis: the Celery app, the job task, worker processes and event relay.

Durability settings (the point of this module):
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only
  after its job is recorded as finished, so a worker that dies mid-job leaves it
  to be redelivered;
- `worker_prefetch_multiplier=1` and one solo-pool process per device: a worker
  holds one job at a time and never hoards others;
- the broker's `visibility_timeout` (setting `visibility_timeout`, default 2 h) is
  longer than the longest job, so a slow CPU job is not handed out twice;
- the task is idempotent: `JobStore.start` refuses finished or cancelled jobs, and
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
from celery import Celery

from ..config import Settings
from ..service import ImageService
from .celery_store import PREFIX, CeleryJobStore
from .events import JobEvents
from .storage import FolderStorage
from .worker import Worker

log = logging.getLogger(__name__)
QUEUE = "refinery"
HEARTBEAT_SECONDS = 5.0
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS  # a worker silent this long is taken for dead


class RunningElsewhere(Exception):
    """The job is running on another live worker (a redelivery that came too early)."""


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis, with the durability settings above."""
    app = Celery("refinery", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Scan for unacknowledged messages of dead workers every 10 s (kombu's default is every 100 s).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout, "unacked_restore_throttle": 1},
        result_expires=24 * 3600,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


class RedisEventSink:
    """Worker side of live events: Redis pub/sub messages, previews as short-lived keys."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        self.redis.publish(f"{PREFIX}events:{job_id}", json.dumps({"event": event, "data": data}))

    def set_preview(self, job_id: str, png: bytes) -> None:
        self.redis.set(f"{PREFIX}preview:{job_id}", png, ex=3600)

    def drop_preview(self, job_id: str) -> None:
        self.redis.delete(f"{PREFIX}preview:{job_id}")


async def forward_events(settings: Settings, events: JobEvents, stop: asyncio.Event) -> None:
    """API server side: relay every worker's events from Redis to this server's watchers."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url)
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{PREFIX}events:*")
    try:
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is None:
                continue
            job_id = message["channel"].decode().rsplit(":", 1)[1]
            payload = json.loads(message["data"])
            if payload["event"] == "preview":
                png = await client.get(f"{PREFIX}preview:{job_id}")
                if isinstance(png, bytes):
                    events.set_preview(job_id, png)
            elif payload["event"] == "done":
                events.drop_preview(job_id)
            events.publish(job_id, payload["event"], payload["data"])
    finally:
        await pubsub.aclose()
        await client.aclose()


class WorkerRuntime:
    """One worker process: its service (models loaded once, kept warm), store, events and heartbeat."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.store = CeleryJobStore(settings)
        self.service = ImageService.from_settings(settings)
        self.sink = RedisEventSink(self.store.redis)
        self.worker = Worker(self.store, self.service, FolderStorage(settings.data_dir / "images"), self.sink,
                             preview_every=settings.preview_every, name=name, poll_cancel=True)  # fmt: skip
        self._stop = threading.Event()

    def run_job(self, job_id: str) -> str:
        """The task body: start the job unless it is finished, cancelled or alive elsewhere; run it; record it.

        Raises:
            RunningElsewhere: another live worker holds it; the task is retried later.
        """
        current = self.store.get(job_id)
        if current.status.value == "running" and current.worker not in (None, self.name):
            alive = {worker["name"] for worker in self.store.workers(STALE_AFTER_SECONDS)}
            if current.worker in alive:
                raise RunningElsewhere(f"job {job_id} is running on {current.worker}")
        job = self.store.start(job_id, self.name)
        if job is None:
            log.info("Job %s is already finished or cancelled; nothing to do", job_id)
            return "skipped"
        if self.store.cancel_requested(job_id):
            self.store.mark_cancelled(job_id)
            self.sink.publish(job_id, "done", {"status": "cancelled", "error": "cancelled by request"})
            return "cancelled"
        self._beat()
        asyncio.run(self.worker.process(job))
        self._beat()
        return self.store.get(job_id).status.value

    def _beat(self) -> None:
        described = self.service.describe()
        record = {"name": self.name, "host": socket.gethostname(), "device": described.get("device"),
                  "precision": described.get("precision"), "loaded": self.service.loaded,
                  "current_job": self.worker.current[0] if self.worker.current else None,
                  "seen": time.time()}  # fmt: skip
        self.store.redis.hset(f"{PREFIX}workers", self.name, json.dumps(record))

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._beat()
                except redis.RedisError as error:
                    log.warning("Heartbeat to Redis failed: %s", error)

        self._beat()
        threading.Thread(target=beat, name="refinery-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.store.redis.hdel(f"{PREFIX}workers", self.name)


def run_worker(settings: Settings, name: str) -> None:
    """Load the models, then consume jobs until stopped (SIGTERM finishes the running job first).

    Raises:
        ModelLoadError: the models cannot be loaded.
    """
    runtime = WorkerRuntime(settings, name)
    asyncio.run(runtime.service.load())
    app = make_celery(settings)

    @app.task(  # type: ignore[untyped-decorator]  # celery ships no type hints
        name="refinery.run_job", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
    )
    def run_job(task: Any, job_id: str) -> str:
        try:
            return runtime.run_job(job_id)
        except RunningElsewhere as error:
            raise task.retry(countdown=STALE_AFTER_SECONDS, exc=error) from error

    runtime.start_heartbeat()
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", "--prefetch-multiplier=1", "--without-gossip",
                         "--without-mingle", "--without-heartbeat", "-Q", QUEUE, "-n", f"{name}@%h",
                         "--loglevel=INFO"])  # fmt: skip
    finally:
        runtime.stop()
