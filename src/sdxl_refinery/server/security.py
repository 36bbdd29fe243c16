"""API key checks (Bearer, or HTTP Basic for A1111 clients) and the request body cap."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .keys import Caller

# The OpenAI face's routes: their errors take OpenAI's shape, down to the body cap's.
OPENAI_PATHS = ("/v1/images/generations", "/v1/images/edits", "/v1/images/variations", "/v1/models")


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


def require_api_key(request: Request) -> Caller:
    """Who sent the request: the caller its API key names (everyone is one admin on a server without keys).

    Raises:
        HTTPException: 401 with a WWW-Authenticate challenge, when no valid key is presented.
    """
    caller: Caller | None = request.app.state.refinery.keys.identify(
        presented_key(request.headers.get("authorization", ""))
    )
    if caller is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="a valid API key is required: Authorization: Bearer <key> (or HTTP Basic with the key as password)",
            headers={"WWW-Authenticate": 'Bearer realm="refinery", Basic realm="refinery"'},
        )
    return caller


Authorized = Annotated[Caller, Depends(require_api_key)]


def require_api_key_or_signature(request: Request) -> Caller:
    """Let a correctly signed, unexpired image URL through without the key (the URL itself is the permission:
    whoever was given it may open that one image); anything else needs the key.

    Raises:
        HTTPException: 401, as `require_api_key`.
    """
    signer = request.app.state.refinery.signer
    query = request.query_params
    if signer.verify(request.url.path, query.get("expires"), query.get("signature")):
        return SIGNED_URL
    return require_api_key(request)


SignedOrAuthorized = Annotated[Caller, Depends(require_api_key_or_signature)]
SIGNED_URL = Caller("signed-url", admin=True)  # opens the one image its URL names, whoever's job it is


class BodySizeLimit:
    """ASGI middleware: the whole body is read before the app runs, up to `limit` bytes (413 past it,
    declared or streamed) and within `timeout` seconds of the request head (408 past it: a client that
    stops half way through its body holds nothing)."""

    def __init__(self, app: ASGIApp, limit: int, timeout: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, 413, f"request body larger than {self.limit} bytes", scope["path"])
            return
        body = bytearray()
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - asyncio.get_running_loop().time(), 0))
            except TimeoutError:
                await self._refuse(send, 408, f"request body not received within {self.timeout:g} s", scope["path"])
                return
            if message["type"] != "http.request":
                await self.app(scope, _replay(message, receive), send)
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                await self._refuse(send, 413, f"request body larger than {self.limit} bytes", scope["path"])
                return
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": bytes(body), "more_body": False}
        await self.app(scope, _replay(whole, receive), send)

    @staticmethod
    async def _refuse(send: Send, status: int, detail: str, path: str = "") -> None:
        """The refusal in the error shape of the face the path belongs to (OpenAI's, A1111's, or FastAPI's)."""
        if status == 413:
            detail += " (the server's REFINERY_MAX_BODY_BYTES)"
        if path.startswith(OPENAI_PATHS):
            code = "request_too_large" if status == 413 else "timeout"
            error = {"message": detail, "type": "invalid_request_error", "param": None, "code": code}
            shaped: dict[str, object] = {"error": error}
        elif path.startswith("/sdapi/"):
            shaped = {"error": "PayloadTooLarge" if status == 413 else "RequestTimeout", "detail": detail, "body": "",
                      "errors": detail}  # fmt: skip
        else:
            shaped = {"detail": detail}
        body = json.dumps(shaped).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
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
