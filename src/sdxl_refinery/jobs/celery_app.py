"""The Celery app of the scale-out backend: one queue, and the settings that make it durable.

- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged only
  after its job is recorded as finished, so a worker that dies mid-job leaves it
  to be redelivered;
- `worker_prefetch_multiplier=1` and one solo-pool process per device: a worker
  holds one job at a time and never hoards others;
- the broker's `visibility_timeout` (setting `visibility_timeout`, default 2 h) is
  longer than the longest job, so a slow CPU job is not handed out twice; it is only
  the last backstop: a worker silent for `worker_dead_after_seconds` (15 s) is taken
  for dead by the others, which queue its job again (`CeleryJobStore.reap`).
"""

from __future__ import annotations

from celery import Celery

from ..config import Settings

PREFIX = "refinery:"  # every Redis key and channel of Refinery starts with this
QUEUE = "refinery"
TASK_NAME = "refinery.run_job"
HEARTBEAT_SECONDS = 5.0


def make_celery(settings: Settings) -> Celery:
    """A Celery app on the configured Redis, with the durability settings above."""
    app = Celery("refinery", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Scan for unacknowledged messages of dead workers every 10 s (kombu's default is every 100 s).
        # Every broker command times out (a hung Redis fails a submission with 503 instead of holding it).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_throttle": 1,
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
        },
        redis_socket_timeout=5,
        redis_socket_connect_timeout=5,
        result_expires=24 * 3600,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app
