"""Model folders over HTTP: upscalers (native and A1111 listings, native upscale jobs), and the native
listings of the ControlNet and IP-Adapter folders.

A1111's extras routes (`/sdapi/v1/extra-*`) are in `a1111_extras`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse

from ...editing import HiresUpscaler
from ...upscale_request import NONE, UpscaleRequest
from ..offload import json_body_schema, parsed_body
from ..security import Authorized
from ..state import State
from .jobs import queued

router = APIRouter(tags=["model folders"])


@router.get("/v1/upscalers")
def upscalers(state: State, _: Authorized) -> dict[str, Any]:
    """Upscaler models an upscale job or hires fix may name, with architecture and factor; the resamplers that
    need no file; and files that cannot be used, with the reason."""
    entries = state.service.upscaler_entries()
    models = [{"name": entry.name, "architecture": entry.info.architecture, "scale": entry.info.scale}
              for entry in entries if entry.info is not None]  # fmt: skip
    unusable = {entry.name: entry.reason for entry in entries if entry.info is None}
    resamplers = [NONE, HiresUpscaler.LANCZOS.value, HiresUpscaler.NEAREST.value]
    return {"models": models, "resamplers": resamplers, "unusable": unusable}


@router.get("/sdapi/v1/upscalers")
def a1111_upscalers(state: State, _: Authorized) -> list[dict[str, Any]]:
    """A1111's list: None, Lanczos and Nearest first (no model file), then each usable model of the folder."""
    plain = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
             for name in (NONE, HiresUpscaler.LANCZOS.value, HiresUpscaler.NEAREST.value)]  # fmt: skip
    models = [{"name": entry.name, "model_name": entry.info.architecture, "model_path": str(entry.path),
               "model_url": None, "scale": entry.info.scale}
              for entry in state.service.upscaler_entries() if entry.info is not None]  # fmt: skip
    return plain + models


@router.post("/v1/upscales", status_code=status.HTTP_202_ACCEPTED, openapi_extra=json_body_schema(UpscaleRequest))
async def submit_upscale(state: State, request: Request, caller: Authorized) -> JSONResponse:
    """Queue an upscale (an `UpscaleRequest`): a job like a generation's, followed at `/v1/jobs/{id}`."""
    return await queued(state, request, await parsed_body(request, UpscaleRequest, state.checks), caller)


@router.get("/v1/ip-adapters")
def ip_adapters(state: State, _: Authorized) -> dict[str, Any]:
    """IP-Adapters an image prompt may name (`image_prompts: [{model, image, weight}]`), and files that cannot be
    used, with the reason."""
    entries = state.service.ip_adapter_folder.entries(state.service.base_context_width())
    return {"ip_adapters": [entry.name for entry in entries if entry.reason is None],
            "unusable": {entry.name: entry.reason for entry in entries if entry.reason is not None}}  # fmt: skip


@router.get("/v1/controlnets")
def controlnets(state: State, _: Authorized) -> dict[str, Any]:
    """ControlNets a unit may name (`controlnets: [{model, image, ...}]`), entries that cannot be used, with the
    reason, the preprocessors a unit may name now (model ones only when the annotator folder has them), and for
    each model preprocessor why it cannot run yet (null: it can)."""
    entries = state.service.controlnet_folder.entries(state.service.base_context_width())
    return {"controlnets": [entry.name for entry in entries if entry.reason is None],
            "unusable": {entry.name: entry.reason for entry in entries if entry.reason is not None},
            "preprocessors": state.service.annotator_folder.runnable(),
            "annotators": state.service.annotator_folder.reasons()}  # fmt: skip
