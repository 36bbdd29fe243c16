"""OpenAI-compatible images API: `POST /v1/images/generations` and `GET /v1/models`.

The answer comes when the job is done. Past the server's wait limit the
answer is a 504 whose error names the job id, so the client can poll
`GET /v1/jobs/{id}` instead of losing the work.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequest
from ...jobs.models import JobStatus
from ...request import GenerationRequest
from ..security import Authorized
from ..state import State

router = APIRouter(tags=["openai"])
MODEL_ID = "sdxl-refinery"
_HIGH_QUALITY = {"hd", "high"}


class ImagesRequest(BaseModel):
    """The OpenAI images request; fields OpenAI added later are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = "1024x1024"
    quality: str | None = None
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    user: str | None = None


def _size(size: str | None) -> tuple[int, int]:
    if size in (None, "auto"):
        return 1024, 1024
    match = re.fullmatch(r"(\d+)x(\d+)", size)
    if not match:
        raise InvalidRequest("size", f"must be WIDTHxHEIGHT such as 1024x1024, or auto, not {size!r}")
    return int(match.group(1)), int(match.group(2))


def _openai_error(status: int, message: str, kind: str, code: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code, **extra}}, status_code=status)


@router.post("/v1/images/generations")
async def generate(body: ImagesRequest, state: State, request: Request, _: Authorized) -> JSONResponse:
    """Render `n` images; answers `{created, data: [{b64_json | url, revised_prompt}]}` when done."""
    width, height = _size(body.size)
    guidance = 8.0 if (body.quality or "").lower() in _HIGH_QUALITY else 7.5
    job = state.submit(
        GenerationRequest(prompt=body.prompt, n=body.n, width=width, height=height, guidance_scale=guidance),
        client="openai",
    )
    job = await state.wait(job.id, state.settings.openai_wait_seconds)
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        data = []
        for name in job.result["images"]:
            if body.response_format == "url":
                data.append(
                    {"url": state.image_url(str(request.base_url), job.id, name), "revised_prompt": body.prompt}
                )
            else:
                encoded = base64.b64encode(state.storage.read(job.id, name)).decode()
                data.append({"b64_json": encoded, "revised_prompt": body.prompt})
        return JSONResponse({"created": int(job.finished or time.time()), "data": data})
    if job.status.terminal:
        return _openai_error(500, f"job {job.id} {job.status.value}: {job.error}", "server_error", "job_failed",
                             job_id=job.id)  # fmt: skip
    return _openai_error(
        504, f"job {job.id} is still {job.status.value} after {state.settings.openai_wait_seconds:.0f} s; "
        f"poll GET /v1/jobs/{job.id} for the result", "timeout", "job_pending", job_id=job.id,
    )  # fmt: skip


@router.get("/v1/models")
def models(state: State, _: Authorized) -> dict[str, Any]:
    """The one model served: SDXL base + refiner, as configured."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": MODEL_ID,
                "object": "model",
                "created": created,
                "owned_by": "refinery",
                "base": state.settings.base_model,
                "refiner": state.settings.refiner_model,
            }
        ],
    }
