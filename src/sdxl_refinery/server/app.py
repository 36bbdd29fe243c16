"""The FastAPI app factory: routers, auth, limits, the job store and the in-process worker.

`create_app(settings)` builds everything from one `Settings`; nothing starts
until the app's lifespan begins (models load then, or on the first job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..config import Settings
from ..errors import InvalidRequest, RefineryError, StorageError, StoreUnavailable
from ..jobs.events import JobEvents
from ..jobs.metrics import QueueMetrics
from ..jobs.sqlite_store import SQLiteJobStore
from ..jobs.store import JobStore, QueueFull
from ..jobs.worker import Worker
from ..png import check_writable_folder
from ..request import GenerationRequest
from ..service import ImageService
from ..upscale_request import UpscaleRequest
from .head import HeadAsGet
from .keys import BadKeysFile
from .offload import document_bodies
from .origins import SameOriginWrites
from .routes import (
    a1111,
    a1111_controlnet,
    a1111_extras,
    a1111_options,
    checkpoints,
    jobs,
    loras,
    model_folders,
    openai,
    ops,
)
from .routes.a1111_settings import NotServed, a1111_error
from .routes.openai import openai_error, openai_param
from .security import OPENAI_PATHS, BodySizeLimit
from .signing import WeakSigningKey
from .state import AppState, IdempotencyConflict

log = logging.getLogger(__name__)


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PATHS)


def _unprocessable(request: Request, details: list[dict[str, Any]]) -> JSONResponse:
    """422 with FastAPI's `detail` list; on OpenAI routes OpenAI's 400 `invalid_request_error` naming its param."""
    if not (_is_openai(request) and details):
        return JSONResponse({"detail": details}, status_code=422)
    first = details[0]
    field = str(first["loc"][-1]) if len(first.get("loc", [])) > 1 else None
    param = openai_param(field) if field else None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    response = openai_error(400, message, "invalid_request_error", "invalid_value", param=param)
    return response


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, error: InvalidRequest) -> JSONResponse:
        return _unprocessable(request, [{"loc": ["body", error.field], "msg": error.rule, "type": "value_error"}])

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        details = []
        for item in error.errors():
            cause = (item.get("ctx") or {}).get("error")
            if isinstance(cause, InvalidRequest):  # our own rule, raised while pydantic built the request
                details.append({"loc": [*item.get("loc", []), cause.field], "msg": cause.rule, "type": "value_error"})
                continue
            message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
            details.append({"loc": list(item.get("loc", [])), "msg": message, "type": item.get("type")})
        return _unprocessable(request, details)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        if _is_openai(request):
            return openai_error(429, str(error), "requests", "rate_limit_exceeded", headers=headers)
        return JSONResponse({"detail": str(error)}, status_code=429, headers=headers)

    @app.exception_handler(IdempotencyConflict)
    async def idempotency_conflict(request: Request, error: IdempotencyConflict) -> JSONResponse:
        if _is_openai(request):
            return openai_error(409, str(error), "invalid_request_error", "idempotency_key_reused")
        return JSONResponse({"detail": str(error)}, status_code=409)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, error: StoreUnavailable) -> JSONResponse:
        status = 507 if error.disk_full else 503
        headers = {"Retry-After": "30"}
        if _is_openai(request):
            return openai_error(status, str(error), "server_error", "storage_unavailable", headers=headers)
        return JSONResponse({"detail": str(error)}, status_code=status, headers=headers)

    @app.exception_handler(NotServed)
    async def not_served(request: Request, error: NotServed) -> JSONResponse:
        return a1111_error(404, error.kind, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 401 and _is_openai(request):  # the SDK reads OpenAI's error object
            return openai_error(401, str(error.detail), "invalid_request_error", "invalid_api_key",
                                headers=dict(error.headers or {}))  # fmt: skip
        return await http_exception_handler(request, error)


def _open_store(settings: Settings) -> JobStore:
    """The job store of the configured backend.

    Raises:
        StorageError: the data folder is not writable.
        RefineryError: the Celery backend is chosen but its extra is not installed.
    """
    check_writable_folder(settings.data_dir / "images" / "probe")
    ignore = settings.data_dir / ".gitignore"
    if not ignore.exists():  # a data folder made inside a clone (the default) stays out of `git status`
        ignore.write_text("# Refinery's jobs, images and keys: not for version control\n*\n", encoding="utf-8")
    if settings.backend == "celery":
        try:
            from ..jobs.celery_store import CeleryJobStore
        except ImportError as error:  # the optional extra is not installed
            raise RefineryError(
                f"backend=celery needs the celery extra ({error.name or error} is missing): "
                "pip install 'sdxl-refinery[celery]'"
            ) from error
        return CeleryJobStore(settings)
    return SQLiteJobStore(settings.data_dir / "jobs.sqlite3")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: AppState = app.state.refinery
    state.events.bind(asyncio.get_running_loop())
    tasks: list[asyncio.Task[Any]] = []
    recovered = await asyncio.to_thread(state.store.recover, state.settings.crash_limit)
    if recovered:
        log.warning("Recovered %d job(s) left running by a previous process: %s", len(recovered), recovered)
    if state.store.hands_out_work:  # embedded: this process runs the jobs
        state.worker = Worker(state.store, state.service, state.storage, state.events, state.metrics,
                              state.settings.preview_every, max_batch=state.settings.max_batch,
                              batch_window=state.settings.batch_window_seconds)  # fmt: skip
        if state.settings.load_on_start:
            tasks.append(asyncio.create_task(_load(state)))
        tasks.append(asyncio.create_task(state.worker.run(state.stop, state.store.claim_next)))
    tasks.append(asyncio.create_task(state.store.relay_events(state.events, state.stop)))
    try:
        yield
    finally:
        state.stop.set()
        if state.worker is not None:
            state.worker.stop_current()  # the running job goes back to the queue, nothing is lost
        await _drain(state, tasks)
        state.store.close()


async def _drain(state: AppState, tasks: list[asyncio.Task[Any]]) -> None:
    """Let the running job stop at its next step, for at most the shutdown grace; past it, requeue the job
    now (the engine thread finishes its step on its own) so that nothing depends on the process ending well."""
    grace = state.settings.shutdown_grace_seconds
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for job_id in list(state.worker.current) if pending and state.worker is not None else []:
        log.warning("Job %s is still in its step after %.0f s of shutdown grace: back to the queue now", job_id, grace)
        try:
            await asyncio.to_thread(state.store.requeue, job_id)
        except StoreUnavailable as error:  # the next start's recovery will find it running and requeue it
            log.error("Could not requeue job %s at shutdown: %s", job_id, error)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _load(state: AppState) -> None:
    try:
        await state.service.load()
    except RefineryError as error:
        state.load_error = str(error)
        log.error("Models did not load: %s", error)


def create_app(settings: Settings, service: ImageService | None = None, store: JobStore | None = None) -> FastAPI:
    """Build the app.

    Args:
        settings: everything configurable.
        service: the image service (default: one built from `settings`).
        store: the job store (default: the configured backend's).

    Raises:
        StorageError: the data folder cannot be written.
        RefineryError: the Celery backend is chosen but its extra is not installed.
    """
    try:
        job_store = store or _open_store(settings)
        state = AppState(settings, job_store, service or ImageService.from_settings(settings), JobEvents(),
                         QueueMetrics())  # fmt: skip
    except OSError as error:
        raise StorageError(f"data folder {settings.data_dir} cannot be used: {error}") from error
    except WeakSigningKey as error:  # an empty key would open every image without the API key
        raise StorageError(f"refusing to start: {error}") from error
    except BadKeysFile as error:  # a server meant to be guarded by keys does not run without them
        raise RefineryError(f"refusing to start: API keys file {error}") from error
    # The schema and docs routes are added by `ops.docs_router`, behind the API key like everything else.
    description = "SDXL base + refiner, every image. Native, OpenAI and A1111 APIs."
    app = FastAPI(title="Refinery", version="0.1.0", lifespan=_lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description=description)  # fmt: skip
    app.state.refinery = state
    _install_error_handlers(app)
    document_bodies(app, [GenerationRequest, UpscaleRequest, a1111.Txt2ImgRequest, a1111.Img2ImgRequest,
                          a1111_extras.ExtrasSingleImage, a1111_extras.ExtrasBatchImages,
                          a1111_extras.PngInfoRequest, a1111_controlnet.DetectRequest])  # fmt: skip
    for router in (
        ops.router,
        ops.docs_router,
        jobs.router,
        openai.router,
        a1111.router,
        a1111_options.router,
        a1111_extras.router,
        a1111_controlnet.router,
        model_folders.router,
        loras.router,
        checkpoints.router,
    ):
        app.include_router(router)
    web = resources.files("sdxl_refinery.server").joinpath("web")
    if web.joinpath("index.html").is_file():
        app.mount("/", StaticFiles(directory=str(web), html=True), name="web")
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    app.add_middleware(SameOriginWrites, allowed_origins=settings.cors_origins)
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes, timeout=settings.client_timeout_seconds)
    app.add_middleware(HeadAsGet)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.served_hosts())  # outermost: first check
    return app
