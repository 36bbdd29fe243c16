"""Operations: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ...errors import StoreUnavailable
from ..security import Authorized
from ..state import AppState, State

router = APIRouter(tags=["ops"])
docs_router = APIRouter(include_in_schema=False)


@router.get("/health")
async def health() -> dict[str, str]:
    """The process answers (no key needed); on the loop itself, so a busy thread pool cannot delay it."""
    return {"status": "ok"}


def _workers(state: AppState) -> list[dict[str, Any]]:
    """Embedded: this process's worker. Celery: every worker that reported to Redis lately."""
    remote = state.store.workers()
    if remote is not None:
        return remote
    described = state.service.describe()
    current = list(state.worker.current) if state.worker else []
    name = state.worker.name if state.worker else "embedded"
    return [{"name": name, "host": "local", "device": described.get("device"), "precision": described.get("precision"),
             "loaded": state.service.loaded, "current_job": current[0] if current else None,
             "current_jobs": current}]  # fmt: skip


@router.get("/v1/workers")
def workers(state: State, _: Authorized) -> dict[str, Any]:
    """Workers, their devices, what each runs, and the queue depth."""
    return {"backend": state.settings.backend, "workers": _workers(state), "queue_depth": state.store.depth(),
            "counts": state.store.counts()}  # fmt: skip


def _ready_remote(state: AppState) -> JSONResponse | None:
    """Celery: ready while a worker with loaded models reports to Redis (`warnings`: Redis settings that would
    lose jobs). None for the embedded backend."""
    body: dict[str, Any] = {"sdxl_available": False, "device": None, "precision": None, "queue_depth": None,
                            "workers": None, "error": None}  # fmt: skip
    try:
        remote = state.store.workers()
        if remote is None:
            return None
        body["queue_depth"] = state.store.depth()
        body["warnings"] = state.store.durability_warnings()  # still ready: a warning, not an outage
    except StoreUnavailable as error:  # Redis is lost: no worker can be seen or sent a job
        body["error"] = str(error)
        return JSONResponse(body, status_code=503)
    live = [worker for worker in remote if worker["loaded"]]
    body.update(sdxl_available=bool(live), workers=len(live))
    if live:
        body.update(device=live[0]["device"], precision=live[0]["precision"])
    else:
        body["error"] = "no worker with loaded models has reported lately"
    return JSONResponse(body, status_code=200 if live else 503)


@router.get("/ready")
def ready(state: State, _: Authorized) -> JSONResponse:
    """200 once models are loaded (embedded) or a loaded worker reports (celery), else 503 with the reason."""
    if (remote := _ready_remote(state)) is not None:
        return remote
    described: dict[str, Any] = state.service.describe()
    problem = state.worker.problem if state.worker is not None else None
    try:
        depth: int | None = state.store.depth()
    except StoreUnavailable as error:
        problem, depth = problem or error, None
    body = {"sdxl_available": state.service.loaded, "device": described.get("device"),
            "precision": described.get("precision"), "queue_depth": depth,
            "models": {k: described.get(k) for k in ("base", "refiner", "base_hash", "refiner_hash")},
            "error": state.load_error or (str(problem) if problem else None)}  # fmt: skip
    return JSONResponse(body, status_code=200 if state.service.loaded and problem is None else 503)


@router.get("/metrics")
def metrics(state: State, _: Authorized) -> Response:
    """Prometheus text format: jobs by status, queue depth, step seconds, job durations."""
    state.metrics.observe_store(state.store.counts())
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@docs_router.get("/openapi.json")
def openapi_schema(request: Request, _: Authorized) -> JSONResponse:
    """The OpenAPI schema of every route."""
    return JSONResponse(request.app.openapi())


@docs_router.get("/docs")
def docs(_: Authorized) -> HTMLResponse:
    """Interactive API docs (Swagger UI)."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="Refinery API")
