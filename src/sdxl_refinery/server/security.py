"""API key checks (Bearer, or HTTP Basic for A1111 clients) and the request body cap."""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def presented_key(header: str) -> str | None:
    """The API key in an Authorization header: Bearer, or the password of HTTP Basic; None if neither."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return _utf8(value.strip())
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]  # A1111's --api-auth user:password: the password is the key
    return None


def _utf8(header_text: str) -> str:
    """A header value as the client wrote it: HTTP servers decode header bytes as latin-1, clients send UTF-8."""
    try:
        return header_text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return header_text


def require_api_key(request: Request) -> None:
    """Refuse the request unless it carries the configured API key (when one is set).

    Raises:
        HTTPException: 401 with a WWW-Authenticate challenge.
    """
    expected: str | None = request.app.state.refinery.settings.api_key
    if not expected:
        return
    presented = presented_key(request.headers.get("authorization", ""))
    if presented is None or not secrets.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="a valid API key is required: Authorization: Bearer <key> (or HTTP Basic with the key as password)",
            headers={"WWW-Authenticate": 'Bearer realm="refinery", Basic realm="refinery"'},
        )


Authorized = Annotated[None, Depends(require_api_key)]


def require_api_key_or_signature(request: Request) -> None:
    """Let a correctly signed, unexpired image URL through without the key; anything else needs the key.

    Raises:
        HTTPException: 401, as `require_api_key`.
    """
    signer = request.app.state.refinery.signer
    query = request.query_params
    if not signer.verify(request.url.path, query.get("expires"), query.get("signature")):
        require_api_key(request)


SignedOrAuthorized = Annotated[None, Depends(require_api_key_or_signature)]


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over `limit` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)  # the server reads no more than it declared
            return
        # No declared length (chunked): read the body here, up to the limit, before the app sees it.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay(whole, receive), send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"detail": "request body larger than {self.limit} bytes"}}'.encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(first: Message, then: Receive) -> Receive:
    """A receive channel that gives `first`, then what the client sends next (its disconnect)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await then()

    return receive
