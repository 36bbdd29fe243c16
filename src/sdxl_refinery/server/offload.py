"""Bodies that can be large are parsed and checked off the event loop.

FastAPI parses a JSON body and validates it on the event loop. A request body may carry a
4096x4096 image as 30 MB of base64: parsing, decoding, hashing and checking it takes a few
hundred milliseconds, and 16 such requests at once held `/health` for seconds. Routes that take
such bodies read the bytes (the loop only receives them) and hand them to `parsed_body`, which
validates them in a worker thread; errors come out exactly as FastAPI's own 422s do. Their
OpenAPI schema is declared by `json_body_schema`, with the models' definitions added to the
document's components by `document_bodies`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)
_REF = "#/components/schemas/{model}"


def checks_limiter() -> anyio.CapacityLimiter:
    """How many checks run at once: one per usable CPU but one, so that the event loop's thread always finds a
    core (16 decodes on 2 cores left `/health` waiting 200 ms for the OS to schedule it)."""
    return anyio.CapacityLimiter(max(1, len(os.sched_getaffinity(0)) - 1))


async def parsed_body(request: Request, model: type[Model], limiter: anyio.CapacityLimiter) -> Model:
    """The request's JSON body as `model`, parsed and validated in a worker thread under `limiter`.

    Raises:
        RequestValidationError: the body is not JSON or breaks the model's rules (a 422 naming the field).
    """
    raw = await request.body()
    return await anyio.to_thread.run_sync(_validated, model, raw, limiter=limiter)


def _validated(model: type[Model], raw: bytes) -> Model:
    """As FastAPI validates a body: Python's JSON (which, unlike pydantic's, reads lone surrogates, so that our
    own rule names them), then the model in Python mode."""
    try:
        data = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        position = error.pos if isinstance(error, json.JSONDecodeError) else error.start
        reason = error.msg if isinstance(error, json.JSONDecodeError) else error.reason
        problem = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error", "input": {},
                   "ctx": {"error": reason}}  # fmt: skip
        raise RequestValidationError([problem]) from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(
            [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
        ) from None


async def off_loop(limiter: anyio.CapacityLimiter, work: Callable[..., Any], *args: Any) -> Any:
    """`work(*args)` in a worker thread under `limiter`: checks, hashing and store writes a route must not run
    on the loop."""
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)


def json_body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The `openapi_extra` of a route whose body `parsed_body` reads as `model`."""
    reference = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": reference}}}}


def document_bodies(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add `models` (and what they refer to) to the app's OpenAPI components, so `json_body_schema`'s
    references resolve."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template=_REF)
            for name, definition in schema.pop("$defs", {}).items():
                schemas.setdefault(name, definition)
            schemas[model.__name__] = schema
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
