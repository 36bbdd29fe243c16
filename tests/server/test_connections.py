"""Slow and silent clients cannot hold connections: deadlines for the request head and body (hardening)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlparse

import httpx

from ..waiting import patience
from .conftest import ServerFactory

TIMEOUT = 1.0  # the server's client_timeout_seconds in these tests


def _connect(url: str) -> socket.socket:
    address = urlparse(url)
    connection = socket.create_connection((address.hostname, address.port))
    connection.settimeout(patience(20))
    return connection


def _closed_after(connection: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closed the connection, and what it sent before."""
    started, received = time.monotonic(), b""
    while chunk := connection.recv(4096):
        received += chunk
    return time.monotonic() - started, received


def test_a_silent_connection_is_closed_after_the_deadline(server_factory: ServerFactory) -> None:
    with server_factory(client_timeout_seconds=TIMEOUT) as server:
        waited, received = _closed_after(_connect(server.url))
        assert received == b"" and TIMEOUT * 0.8 <= waited < patience(10)
        assert server.client.get("/health").status_code == 200  # the server itself is untouched


def test_a_trickled_request_head_does_not_extend_the_deadline(server_factory: ServerFactory) -> None:
    with server_factory(client_timeout_seconds=TIMEOUT) as server:
        connection = _connect(server.url)
        started = time.monotonic()
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: localhost\r\n", b"X-Slow: 1\r\n"):
            connection.sendall(piece)
            time.sleep(TIMEOUT / 3)
        _waited, received = _closed_after(connection)
        assert received == b"" and time.monotonic() - started < patience(10)


def test_a_stalled_body_is_a_408(server_factory: ServerFactory) -> None:
    with server_factory(client_timeout_seconds=TIMEOUT) as server:
        connection = _connect(server.url)
        connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100\r\n\r\n{\"prompt\": ")  # fmt: skip
        _waited, received = _closed_after(connection)
        assert received.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in received
        assert server.client.get("/v1/jobs").json()["total"] == 0  # nothing was queued


def test_keep_alive_clients_and_slow_but_steady_requests_still_work(server_factory: ServerFactory) -> None:
    with server_factory(client_timeout_seconds=TIMEOUT) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(3):  # one connection, kept alive across requests spaced past the head deadline
            assert client.get("/health").status_code == 200
            time.sleep(TIMEOUT * 0.6)
        job = client.post("/v1/jobs", json={"prompt": "a cat", "width": 256, "height": 256})
        assert job.status_code == 202, job.text
