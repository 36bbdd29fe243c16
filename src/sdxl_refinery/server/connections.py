"""Deadlines for slow or silent clients, so that idle half-open connections cannot pile up.

uvicorn closes a keep-alive connection left idle after a response (5 s), but a connection that never
finishes its request head (silent since it opened, or trickling header bytes) is held for ever. The
protocol below gives the head `client_timeout_seconds` from its first byte (or from the connection's
opening), then closes the connection; `BodySizeLimit` gives the body the same time.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head is not complete in time."""

    head_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            self._arm()  # an armed deadline stays as it is: trickled bytes do not extend it
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # idle now: uvicorn's keep-alive timeout governs until the next bytes come

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._waiting_for_head():
            log.info("Closing a connection from %s: no complete request within %g s", self.client, self.head_timeout)
            self.transport.close()


def http_protocol(head_timeout: float) -> type[HeadDeadlineProtocol]:
    """The protocol class to give uvicorn (`http=`), with this deadline for request heads."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": head_timeout})
