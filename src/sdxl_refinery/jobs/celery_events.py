"""Live events across processes: workers publish to Redis, API servers relay them to their watchers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import redis

from ..config import Settings
from .celery_app import PREFIX
from .events import JobEvents


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
