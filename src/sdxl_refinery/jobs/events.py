"""In-process job events for live watchers (SSE, the web page, A1111's progress route).

Workers publish from any thread; each subscriber gets an asyncio queue on the
server's event loop. The latest preview of each running job is kept for
clients that poll (A1111's `current_image`).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class JobEvents:
    """Fan-out of job events to subscribers on one event loop."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        self._previews: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver events on `loop` (the server's)."""
        self._loop = loop

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        """Send an event to the job's subscribers; safe from any thread."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._deliver, job_id, {"event": event, "data": data})

    def _deliver(self, job_id: str, message: dict[str, Any]) -> None:
        for queue in list(self._subscribers.get(job_id, ())):
            queue.put_nowait(message)

    def subscribe(self, job_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[dict[str, Any]]) -> None:
        subscribers = self._subscribers.get(job_id)
        if subscribers is not None:
            subscribers.discard(queue)
            if not subscribers:
                del self._subscribers[job_id]

    def set_preview(self, job_id: str, png: bytes) -> None:
        with self._lock:
            self._previews[job_id] = png

    def preview(self, job_id: str) -> bytes | None:
        with self._lock:
            return self._previews.get(job_id)

    def drop_preview(self, job_id: str) -> None:
        with self._lock:
            self._previews.pop(job_id, None)
