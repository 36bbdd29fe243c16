"""Live events across processes: workers publish to Redis, API servers relay them to their watchers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import redis

from ..config import Settings
from .celery_app import PREFIX
from .events import JobEvents

log = logging.getLogger(__name__)
RELAY_RETRY_MAX_SECONDS = 10.0
QUIET_SECONDS = 5.0


class RedisEventSink:
    """Worker side of live events: Redis pub/sub messages, previews as short-lived keys.

    Live events are a view of the job, whose record is in the store: while Redis is unreachable they are
    dropped with a warning (once per outage), and the job runs on; watchers see its state when they ask.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._failing = False
        self._quiet_until = 0.0  # while failing, events are dropped without trying until then

    def _send(self, what: str, command: Any, *args: Any, **kwargs: Any) -> None:
        if self._failing and time.monotonic() < self._quiet_until:
            return  # each try against a lost Redis waits for its timeout: the steps should not
        try:
            command(*args, **kwargs)
        except redis.RedisError as error:
            if not self._failing:
                log.warning("Live events are not reaching Redis (%s dropped): %s", what, error)
            self._failing = True
            self._quiet_until = time.monotonic() + QUIET_SECONDS
            return
        if self._failing:
            log.warning("Live events reach Redis again")
        self._failing = False

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        message = json.dumps({"event": event, "data": data})
        self._send(f"{event} event", self.redis.publish, f"{PREFIX}events:{job_id}", message)

    def set_preview(self, job_id: str, png: bytes) -> None:
        self._send("preview", self.redis.set, f"{PREFIX}preview:{job_id}", png, ex=3600)

    def drop_preview(self, job_id: str) -> None:
        self._send("preview removal", self.redis.delete, f"{PREFIX}preview:{job_id}")


async def forward_events(settings: Settings, events: JobEvents, stop: asyncio.Event) -> None:
    """API server side: relay every worker's events from Redis to this server's watchers, until `stop`.

    A lost connection is logged and made again with backoff (events sent meanwhile are missed; job
    records are not, and watchers read those).
    """
    delay = 0.5
    while not stop.is_set():
        try:
            await _relay(settings, events, stop)
            return
        except (redis.RedisError, OSError) as error:
            log.warning("Relay of live events from Redis lost (%s); connecting again in %.1f s", error, delay)
            with contextlib.suppress(TimeoutError):  # the pause ran out: connect again
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, RELAY_RETRY_MAX_SECONDS)


async def _relay(settings: Settings, events: JobEvents, stop: asyncio.Event) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, health_check_interval=10)
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
