"""The native API: jobs you submit, watch, list and cancel, and the images they make."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import FileResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse

from ...jobs.models import Job, JobRequest, JobStatus
from ...jobs.store import Dedup, JobNotFound
from ...limits import request_schema
from ...request import MAX_SEED, GenerationRequest
from ..dedup import dedup_for
from ..keys import Caller
from ..offload import json_body_schema, off_loop, parsed_body
from ..security import Authorized, SignedOrAuthorized
from ..state import AppState, State

router = APIRouter(tags=["jobs"])
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def _job_or_404(state: AppState, job_id: str, caller: Caller) -> Job:
    """The job, if `caller` may see it; another key's job is a 404 too, so ids reveal nothing."""
    if not _JOB_ID.match(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    try:
        job = state.store.get(job_id)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}") from None
    if not caller.sees(job.owner):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id!r}")
    return job


@router.get("/v1/schema")
def schema(state: State, _: Authorized) -> dict[str, Any]:
    """Every request field: type, default, bounds (with this server's caps), description and face names."""
    return {"fields": request_schema(state.limits), "max_seed": MAX_SEED}


@router.post("/v1/jobs", status_code=status.HTTP_202_ACCEPTED, openapi_extra=json_body_schema(GenerationRequest))
async def submit_job(state: State, request: Request, caller: Authorized) -> JSONResponse:
    """Queue a generation (a `GenerationRequest`); answers once the job is stored, with its id and queue position."""
    return await queued(state, request, await parsed_body(request, GenerationRequest, state.checks), caller)


async def queued(state: AppState, http: Request, body: JobRequest, caller: Caller) -> JSONResponse:
    """Store a native job (the checks and the store write in a worker thread) and answer 202 with its id, queue
    position and URL (also in `Location`)."""
    dedup = dedup_for(http, body, "native", retries_attach=False)
    job, position = await off_loop(state.checks, _submitted, state, body, dedup, caller)
    view: dict[str, Any] = {"id": job.id, "status": job.status.value, "position": position,
                            "url": str(http.url_for("get_job", job_id=job.id))}  # fmt: skip
    return JSONResponse(view, status_code=202, headers={"Location": view["url"]})


def _submitted(state: AppState, body: JobRequest, dedup: Dedup | None, caller: Caller) -> tuple[Job, int | None]:
    job = state.submit(body, client="native", dedup=dedup, caller=caller)
    return job, state.store.position(job.id)


@router.get("/v1/jobs")
def list_jobs(
    state: State,
    request: Request,
    caller: Authorized,
    offset: int = Query(0, ge=0, le=1_000_000_000),
    limit: int = Query(20, ge=1, le=100),
    job_status: JobStatus | None = Query(None, alias="status"),
) -> dict[str, Any]:
    """The caller's jobs (an admin key's: everyone's), newest first, a page at a time."""
    jobs, total = state.store.list(offset, limit, job_status, owner=None if caller.admin else caller.name)
    base = str(request.base_url)
    items = [state.job_view(job, base, brief=True) for job in jobs]
    return {"items": items, "total": total, "offset": offset, "limit": limit}


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, state: State, request: Request, caller: Authorized) -> dict[str, Any]:
    """Status, progress (stage, step, total, percent, ETA), result or error."""
    return state.job_view(_job_or_404(state, job_id, caller), str(request.base_url))


@router.post("/v1/jobs/{job_id}/cancel")
def cancel_job(job_id: str, state: State, request: Request, caller: Authorized) -> dict[str, Any]:
    """Cancel a queued job at once, or a running one within one step; finished jobs are left as they are."""
    _job_or_404(state, job_id, caller)
    return state.job_view(state.cancel(job_id), str(request.base_url))


@router.get("/v1/jobs/{job_id}/events")
async def job_events(job_id: str, state: State, request: Request, caller: Authorized) -> EventSourceResponse:
    """Server-Sent Events: `queued` (position), `started`, `progress`, `preview` (PNG, base64), `done`."""
    await asyncio.to_thread(_job_or_404, state, job_id, caller)
    base = str(request.base_url)
    return EventSourceResponse(_event_stream(state, job_id, base, request), ping=15)


async def _event_stream(state: AppState, job_id: str, base: str, request: Request) -> AsyncIterator[dict[str, str]]:
    queue = state.events.subscribe(job_id)
    try:
        job = await asyncio.to_thread(state.store.get, job_id)
        yield {"event": "state", "data": json.dumps(state.job_view(job, base))}
        png = state.events.preview(job_id) if job.status.value == "running" else None
        if png is not None:  # a watcher that joins mid-run sees the latest preview at once
            current = {"step": job.progress.step, "stage": job.progress.stage}
            yield {"event": "preview", "data": json.dumps({**current, "image": _data_url(png)})}
        if job.status.terminal:
            yield {"event": "done", "data": json.dumps({"status": job.status.value, "error": job.error})}
            return
        while not await request.is_disconnected():
            try:
                message = await asyncio.wait_for(queue.get(), timeout=5.0)
            except TimeoutError:
                job = await asyncio.to_thread(state.store.get, job_id)
                if job.status.value == "queued":
                    yield {"event": "queued", "data": json.dumps({"position": state.store.position(job_id)})}
                if job.status.terminal:  # finished without us seeing it (another process did it)
                    yield {"event": "done", "data": json.dumps({"status": job.status.value, "error": job.error})}
                    return
                continue
            data = dict(message["data"])
            if message["event"] == "preview":
                png = state.events.preview(job_id)
                if png is None:
                    continue
                data["image"] = _data_url(png)
            if message["event"] == "done":
                job = await asyncio.to_thread(state.store.get, job_id)
                data = {"status": job.status.value, "error": job.error, "job": state.job_view(job, base)}
            yield {"event": message["event"], "data": json.dumps(data)}
            if message["event"] == "done":
                return
    finally:
        state.events.unsubscribe(job_id, queue)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@router.get("/v1/images/{job_id}/{name}", response_class=FileResponse)
def get_image(job_id: str, name: str, state: State, caller: SignedOrAuthorized) -> FileResponse:
    """A finished job's PNG, with its owner's (or an admin) key or a signed URL. Nothing outside the data folder
    is served."""
    if not caller.admin:
        _job_or_404(state, job_id, caller)
    path = state.storage.path(job_id, name)
    if path is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="no such image")
    return FileResponse(path, media_type="image/png")
