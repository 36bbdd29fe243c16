"""A1111-compatible API (`/sdapi/v1/...`) for Open WebUI, SillyTavern and `webuiapi` scripts.

Every image is still refined: a request without `refiner_checkpoint` gets the
documented sequential recipe; `refiner_switch_at` selects SDXL's handoff mode
at that point. Unknown fields are accepted and ignored, as A1111 does.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from ...jobs.models import Job, JobStatus
from ...request import GenerationRequest, Mode
from ..security import Authorized
from ..state import AppState, State

router = APIRouter(tags=["a1111"])
SAMPLER = "Euler"


class Txt2ImgRequest(BaseModel):
    """The A1111 fields Refinery uses; the rest of A1111's many fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 50
    cfg_scale: float = 8.0
    width: int = 1024
    height: int = 1024
    seed: int = -1
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    send_images: bool = True
    save_images: bool = False


def _request(body: Txt2ImgRequest) -> GenerationRequest:
    handoff = body.refiner_switch_at is not None
    fields: dict[str, Any] = {
        "prompt": body.prompt, "negative_prompt": body.negative_prompt, "num_inference_steps": body.steps,
        "guidance_scale": body.cfg_scale, "width": body.width, "height": body.height,
        "seed": None if body.seed < 0 else body.seed, "n": body.batch_size * body.n_iter,
        "mode": Mode.HANDOFF if handoff else Mode.SEQUENTIAL,
    }  # fmt: skip
    if handoff:
        fields["switch_at"] = body.refiner_switch_at
    return GenerationRequest(**fields)


def _info(job: Job) -> str:
    result = job.result or {}
    metadata = result.get("metadata", {})
    seeds = result.get("seeds", [])
    request = job.request
    return json.dumps({
        "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds, "steps": request.num_inference_steps, "cfg_scale": request.guidance_scale,
        "width": request.width, "height": request.height, "sampler_name": SAMPLER,
        "sd_model_name": metadata.get("models", {}).get("base"), "refiner_steps": metadata.get("refiner_steps"),
        "refined": metadata.get("refined"), "job_id": job.id,
    })  # fmt: skip


@router.post("/sdapi/v1/txt2img")
async def txt2img(body: Txt2ImgRequest, state: State, _: Authorized) -> dict[str, Any]:
    """Render and answer `{images, parameters, info}` when done (A1111 answers synchronously too)."""
    job = state.submit(_request(body), client="a1111")
    job = await state.wait(job.id, state.settings.openai_wait_seconds)
    images: list[str] = []
    if job.status is JobStatus.SUCCEEDED and job.result is not None and body.send_images:
        images = [base64.b64encode(state.storage.read(job.id, n)).decode() for n in job.result["images"]]
    parameters = body.model_dump()
    if job.status is JobStatus.SUCCEEDED:
        return {"images": images, "parameters": parameters, "info": _info(job)}
    info = json.dumps({"job_id": job.id, "status": job.status.value, "error": job.error})
    return {"images": [], "parameters": parameters, "info": info}


def _running(state: AppState) -> Job | None:
    jobs, _ = state.store.list(0, 1, JobStatus.RUNNING)
    return jobs[0] if jobs else None


@router.get("/sdapi/v1/progress")
def progress(state: State, _: Authorized, skip_current_image: bool = False) -> dict[str, Any]:
    """The running job's progress (0..1), ETA, step and live preview, as A1111 reports them."""
    job = _running(state)
    queued = state.store.counts()["queued"]
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": "Waiting...",
                "state": {"job": "", "job_count": queued, "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                          "interrupted": False, "skipped": False}}  # fmt: skip
    preview = None if skip_current_image else state.events.preview(job.id)
    stage = job.progress.as_dict()["stage_name"]
    return {
        "progress": round(job.progress.percent / 100, 4), "eta_relative": job.progress.eta or 0.0,
        "current_image": base64.b64encode(preview).decode() if preview else None,
        "textinfo": f"{stage} step {job.progress.step}/{job.progress.total}",
        "state": {"job": job.id, "job_count": queued + 1, "job_no": 0, "sampling_step": job.progress.step,
                  "sampling_steps": job.progress.total, "interrupted": job.cancel_requested, "skipped": False,
                  "job_timestamp": str(int(job.started or 0))},
    }  # fmt: skip


@router.post("/sdapi/v1/interrupt")
def interrupt(state: State, _: Authorized) -> dict[str, Any]:
    """Stop the running job within one step."""
    job = _running(state)
    if job is not None:
        state.cancel(job.id)
    return {"interrupted": job.id if job else None}


@router.get("/sdapi/v1/sd-models")
def sd_models(state: State, _: Authorized) -> list[dict[str, Any]]:
    """The base and the refiner, with their A1111 model hashes once loaded."""
    described = state.service.describe()
    rows = []
    for role in ("base", "refiner"):
        reference = getattr(state.settings, f"{role}_model")
        short = described.get(f"{role}_hash")
        rows.append({"title": f"{reference} [{short}]" if short else reference,
                     "model_name": described.get(role, reference.split("/")[-1]), "hash": short, "sha256": None,
                     "filename": reference, "config": None})  # fmt: skip
    return rows


@router.get("/sdapi/v1/options")
def options(state: State, _: Authorized) -> dict[str, Any]:
    """The options A1111 clients read: which checkpoint and refiner are active."""
    return {"sd_model_checkpoint": state.settings.base_model, "sd_checkpoint_hash": state.service.describe().get(
        "base_hash"), "refiner_checkpoint": state.settings.refiner_model, "samples_format": "png"}  # fmt: skip


@router.get("/sdapi/v1/samplers")
def samplers(_: Authorized) -> list[dict[str, Any]]:
    """The one sampler Refinery runs (SDXL's Euler schedule, for both stages)."""
    return [{"name": SAMPLER, "aliases": ["euler"], "options": {}}]


@router.get("/sdapi/v1/scripts")
def scripts(_: Authorized) -> dict[str, list[str]]:
    """No A1111 scripts or extensions run here; clients probe this to find out."""
    return {"txt2img": [], "img2img": []}
