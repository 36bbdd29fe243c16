"""No drive-by control: a page on another site cannot make the browser change anything here.

A browser sends `Origin` with every cross-site POST (forms and `fetch` alike). A state-changing request
whose `Origin` is neither this server's own nor one of `REFINERY_CORS_ORIGINS` is refused with 403 before it
reaches a route. Requests without `Origin` (curl, SDKs, other servers) are not from a browser page and pass;
the API key, when set, still applies to them.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SameOriginWrites:
    """ASGI middleware: 403 for a cross-site state-changing request from an origin not listed."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = {origin.rstrip("/") for origin in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = dict(scope.get("headers", []))
            origin = headers.get(b"origin", b"").decode("latin-1")
            host = headers.get(b"host", b"").decode("latin-1")
            if origin and not self._allowed(origin, host):
                await _refuse(send, origin)
                return
        await self.app(scope, receive, send)

    def _allowed(self, origin: str, host: str) -> bool:
        return origin.rstrip("/") in self.allowed or (origin != "null" and urlsplit(origin).netloc == host)


async def _refuse(send: Send, origin: str) -> None:
    body = (f'{{"detail": "a cross-site request from {origin[:100]!r} may not change anything here; list the site '
            f'in REFINERY_CORS_ORIGINS to allow it"}}').encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})
