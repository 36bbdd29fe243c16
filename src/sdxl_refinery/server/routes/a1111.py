"""A1111-compatible API (`/sdapi/v1/...`) for Open WebUI, SillyTavern and `webuiapi` scripts.

Every image is still refined: a request without `refiner_checkpoint` gets the
documented sequential recipe; `refiner_switch_at` selects SDXL's handoff mode
at that point. Unknown fields are accepted and ignored, as A1111 does.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, create_model

from ...errors import InvalidRequest
from ...input_images import http_input_image
from ...jobs.models import Job, JobStatus
from ...png import a1111_parameters
from ...request import REQUEST_FIELDS, GenerationRequest, Mode
from ...samplers import a1111_samplers
from ..dedup import dedup_for
from ..keys import Caller
from ..offload import json_body_schema, off_loop, parsed_body
from ..security import Authorized
from ..state import AppState, State
from .a1111_controlnet import controlnet_units
from .a1111_settings import a1111_error, check_settings, stored_options

router = APIRouter(tags=["a1111"])


def _table_fields() -> dict[str, Any]:
    """Every request field with an A1111 name, optional here so an omitted one takes the request's default."""
    fields: dict[str, Any] = {}
    for spec in REQUEST_FIELDS:
        if spec.faces.a1111:
            kind = (str | int) if spec.choices else spec.kind  # A1111 sends some choices by number (resize_mode)
            fields[spec.faces.a1111] = (kind | None, Field(None, description=spec.description))
    return fields


class _Txt2ImgBase(BaseModel):
    """A1111's own fields that are not request fields one to one; the rest come from the request table."""

    model_config = ConfigDict(extra="ignore")  # A1111 clients send many fields Refinery has no use for

    n_iter: int = Field(1, ge=1, description="Batches; Refinery renders batch_size x n_iter images in one job.")
    sampler_index: str | None = Field(None, description="A1111's older name for sampler_name (used when it is absent).")
    send_images: bool = True
    save_images: bool = False
    override_settings: dict[str, Any] = Field(default_factory=dict, description="A1111 options for this request.")
    override_settings_restore_afterwards: bool = Field(True, description="Overrides never outlive their request.")
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="Of A1111's scripts, ControlNet's "
                                             "units (`controlnet.args`) are read; others are ignored.")  # fmt: skip

    def to_request(
        self, options: Mapping[str, Any] | None = None, check: Callable[[GenerationRequest], None] | None = None
    ) -> GenerationRequest:
        """The request this body asks for: table fields by their A1111 names, then A1111's conventions.

        A field the body leaves out is taken from its A1111 option (`Faces.a1111_option`), in
        `override_settings` first, then in the stored `options`. `check` (the server's own checks of a
        request, e.g. clip skip against its encoders) runs on the result, so its errors name where a value
        came from too.

        Raises:
            InvalidRequest: naming the A1111 field (or option) and its rule.
        """
        sent = self.model_dump(exclude_unset=True)
        fields: dict[str, Any] = {}
        origin: dict[str, str] = {}  # which A1111 name each value came from, for errors
        for spec in REQUEST_FIELDS:
            option = spec.faces.a1111_option
            if spec.faces.a1111 and sent.get(spec.faces.a1111) is not None:
                fields[spec.name], origin[spec.name] = sent[spec.faces.a1111], spec.faces.a1111
            elif option and self.override_settings.get(option) is not None:
                fields[spec.name], origin[spec.name] = self.override_settings[option], f"override_settings.{option}"
            elif option and options and options.get(option) is not None:
                fields[spec.name], origin[spec.name] = options[option], option
        if "sampler" not in fields and self.sampler_index is not None:
            fields["sampler"], origin["sampler"] = self.sampler_index, "sampler_index"
        if fields.get("seed", 0) < 0:  # A1111: -1 is a random seed
            del fields["seed"]
        for side in ("width", "height"):  # A1111 makes floor(size / 8) * 8: its latents are an eighth of the size
            if isinstance(fields.get(side), int):
                fields[side] -= fields[side] % 8
        if self.n_iter > 1:
            fields["n"] = fields.get("n", GenerationRequest.default("n")) * self.n_iter
        if "switch_at" in fields:  # A1111's refiner_switch_at is SDXL's handoff
            fields["mode"] = Mode.HANDOFF
        self._images(fields, origin)
        units, prompts = controlnet_units(self.alwayson_scripts)
        if units:
            fields["controlnets"], origin["controlnets"] = units, "alwayson_scripts.controlnet.args"
        if prompts:  # IP-Adapter units: numbered among the image prompts, named by the extension's key
            fields["image_prompts"], origin["image_prompts"] = prompts, "alwayson_scripts.controlnet.ip-adapters"
        _strength_zero_as_a1111(fields)
        if str(fields.get("refiner_model", "?")).strip().lower() in ("", "none"):
            del fields["refiner_model"]  # A1111's "no refiner chosen": Refinery refines with its own
        try:
            request = GenerationRequest(**fields)
            if check is not None:
                check(request)
        except InvalidRequest as error:
            field, dot, rest = error.field.partition(".")
            nested = field in ("controlnets", "image_prompts")
            renamed = origin.get(field, field) + dot + rest if nested else origin.get(field, field)
            raise InvalidRequest(renamed, error.rule) from None
        return request

    def _images(self, fields: dict[str, Any], origin: dict[str, str]) -> None:
        """The init image and mask of an img2img body (none in txt2img)."""


class _Img2ImgBase(_Txt2ImgBase):
    """A1111's img2img body: the txt2img fields plus its images, as base64 (with or without a data: prefix)."""

    init_images: list[str] = Field(default_factory=list, description="One base64 image to start from.")
    mask: str | None = Field(None, description="Inpainting mask, base64: white is repainted.")
    inpainting_mask_invert: int = Field(0, ge=0, le=1, description="1 (or true): repaint the black part instead.")
    include_init_images: bool = Field(False, description="Echo init_images and mask back in `parameters`.")

    def _images(self, fields: dict[str, Any], origin: dict[str, str]) -> None:
        if len(self.init_images) != 1:
            raise InvalidRequest("init_images", f"must hold exactly one base64 image, not {len(self.init_images)}")
        for name, source, value in (("init_image", "init_images[0]", self.init_images[0]),
                                    ("mask_image", "mask", self.mask)):  # fmt: skip
            if value is None:
                continue
            try:
                fields[name], origin[name] = http_input_image(value), source
            except ValueError as error:
                raise InvalidRequest(source, str(error)) from None
        fields["mask_invert"], origin["mask_invert"] = bool(self.inpainting_mask_invert), "inpainting_mask_invert"


_A1111_NAMES = {spec.name: spec.faces.a1111 or f"override_settings.{spec.faces.a1111_option}" for spec in
                REQUEST_FIELDS if spec.faces.a1111 or spec.faces.a1111_option}  # fmt: skip


def _strength_zero_as_a1111(fields: dict[str, Any]) -> None:
    """A1111 clients send `denoising_strength: 0` when it is unused (dropped here); where it is used (an init
    image, hires fix) A1111 still runs one step, and so does Refinery: the smallest strength that runs one."""
    if fields.get("strength") != 0:
        return
    if "init_image" not in fields and not fields.get("enable_hr"):
        del fields["strength"]
        return
    steps = fields.get("num_inference_steps") or GenerationRequest.default("num_inference_steps")
    if fields.get("enable_hr") and fields.get("hr_second_pass_steps"):
        steps = fields["hr_second_pass_steps"]
    if isinstance(steps, int) and steps > 0:
        fields["strength"] = math.nextafter(1 / steps, 1.0)  # int(steps * 1/steps) may round to 0 otherwise


Txt2ImgRequest = create_model("Txt2ImgRequest", __base__=_Txt2ImgBase, **_table_fields())
Img2ImgRequest = create_model("Img2ImgRequest", __base__=_Img2ImgBase, **_table_fields())


def a1111_info(job: Job) -> str:
    """A finished job as A1111's `info` JSON text: A1111's keys (infotexts are the PNGs' `parameters`), then ours."""
    result = job.result or {}
    metadata = result.get("metadata", {})
    models = metadata.get("models", {})
    seeds = result.get("seeds", [])
    request = job.request
    assert isinstance(request, GenerationRequest)  # txt2img and img2img jobs only
    count = len(seeds)
    infotexts = [a1111_parameters(metadata, index) for index in range(count)] if "request" in metadata else []
    started = time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created))
    return json.dumps({
        "prompt": request.prompt, "all_prompts": [request.prompt] * count, "negative_prompt": request.negative_prompt,
        "all_negative_prompts": [request.negative_prompt] * count, "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": request.width, "height": request.height, "sampler_name": request.sampler.value,
        "scheduler": request.scheduler.value,
        "cfg_scale": request.guidance_scale,
        "steps": request.num_inference_steps, "batch_size": request.n, "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": models.get("base"), "sd_model_hash": models.get("base_hash"),
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": request.strength if request.init_image or request.enable_hr else 0,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts,
        "styles": [], "job_timestamp": started, "clip_skip": request.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": "refinery", "refiner_checkpoint": models.get("refiner"), "refiner_steps": metadata.get(
            "refiner_steps"), "refined": metadata.get("refined"), "interrupted": metadata.get("interrupted", False),
        "job_id": job.id,
    })  # fmt: skip


@router.post("/sdapi/v1/txt2img", openapi_extra=json_body_schema(Txt2ImgRequest))
async def txt2img(state: State, http: Request, caller: Authorized) -> Any:
    """Render and answer `{images, parameters, info}` when done, as A1111 does: no time limit unless set.

    A client that disconnects leaves its job running (A1111 clients stop one with `/interrupt`).
    """
    body = await parsed_body(http, Txt2ImgRequest, state.checks)
    return await _render(body, state, http, caller, body.model_dump())


@router.post("/sdapi/v1/img2img", openapi_extra=json_body_schema(Img2ImgRequest))
async def img2img(state: State, http: Request, caller: Authorized) -> Any:
    """img2img and inpainting (with `mask`), answered as txt2img is; `parameters` leaves the images out unless
    `include_init_images`, as A1111 does."""
    body = await parsed_body(http, Img2ImgRequest, state.checks)
    hidden = set() if body.include_init_images else {"init_images", "mask"}
    return await _render(body, state, http, caller, body.model_dump(exclude=hidden))


def _submit(body: _Txt2ImgBase, state: AppState, http: Request, caller: Caller) -> Job:
    """Check the overrides, build the request (decoding its images) and queue it: in a worker thread."""
    check_settings(state, body.override_settings, prefix="override_settings.")
    generation = body.to_request(stored_options(state), check=state.service.check_clip_skip)
    try:
        dedup = dedup_for(http, generation, "a1111", True)
        return state.submit(generation, client="a1111", dedup=dedup, caller=caller)
    except InvalidRequest as error:  # a server-side check (caps, LoRAs, checkpoints): named as A1111 names it
        field = error.field.replace("controlnets.", "alwayson_scripts.controlnet.args.", 1)
        field = field.replace("image_prompts.", "alwayson_scripts.controlnet.ip-adapters.", 1)
        raise InvalidRequest(_A1111_NAMES.get(field, field), error.rule) from None


async def _render(
    body: _Txt2ImgBase, state: AppState, http: Request, caller: Caller, parameters: dict[str, Any]
) -> Any:
    job: Job = await off_loop(state.checks, _submit, body, state, http, caller)
    job = await state.wait(job.id, state.settings.sync_wait_seconds)
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        names = job.result["images"] if body.send_images else []
        images = [base64.b64encode(state.storage.read(job.id, name)).decode() for name in names]
        if not await http.is_disconnected():  # a retry of this call would render again
            await asyncio.to_thread(state.store.mark_answered, job.id)
        return {"images": images, "parameters": parameters, "info": a1111_info(job)}
    if job.status is JobStatus.CANCELLED:
        info = json.dumps({"job_id": job.id, "status": job.status.value, "error": job.error})
        return {"images": [], "parameters": parameters, "info": info}
    if job.status is JobStatus.FAILED:
        return a1111_error(500, "GenerationFailed", f"job {job.id} failed: {job.error}", job_id=job.id)
    waited = f"{state.settings.sync_wait_seconds:.0f} s"
    message = f"job {job.id} is still {job.status.value} after {waited}; poll GET /v1/jobs/{job.id}"
    return a1111_error(504, "Timeout", message, job_id=job.id)


def _running(state: AppState, caller: Caller) -> Job | None:
    """The running job the caller may see (its own; an admin's: any)."""
    jobs, _ = state.store.list(0, 1, JobStatus.RUNNING, owner=None if caller.admin else caller.name)
    return jobs[0] if jobs else None


@router.get("/sdapi/v1/progress")
def progress(state: State, caller: Authorized, skip_current_image: bool = False) -> dict[str, Any]:
    """The caller's running job's progress (0..1), ETA, step and live preview, as A1111 reports them."""
    job = _running(state, caller)
    queued = state.store.counts()["queued"]
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": "Waiting...",
                "state": {"job": "", "job_count": queued, "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
                          "interrupted": False, "skipped": False}}  # fmt: skip
    preview = None if skip_current_image else state.events.preview(job.id)
    stage = job.progress.as_dict()["stage_name"]
    shared = f" (in a batch of {job.batch['jobs']} jobs, {job.batch['images']} images)" if job.batch else ""
    return {
        "progress": round(job.progress.percent / 100, 4), "eta_relative": job.progress.eta or 0.0,
        "current_image": base64.b64encode(preview).decode() if preview else None,
        "textinfo": f"{stage} step {job.progress.step}/{job.progress.total}{shared}",
        "state": {"job": job.id, "job_count": queued + 1, "job_no": 0, "sampling_step": job.progress.step,
                  "sampling_steps": job.progress.total, "interrupted": job.interrupt_requested or job.cancel_requested,
                  "skipped": False,
                  "job_timestamp": str(int(job.started or 0))},
    }  # fmt: skip


@router.post("/sdapi/v1/interrupt")
def interrupt(state: State, caller: Authorized) -> dict[str, Any]:
    """Stop the running job within one step; its caller gets the image as it stands, `info` says interrupted.

    Queued jobs are left as they are, as in A1111 (the native `POST /v1/jobs/{id}/cancel` discards instead).
    """
    job = _running(state, caller)  # another key's job is not this caller's to stop
    if job is not None:
        state.interrupt(job.id)
    return {"interrupted": job.id if job else None}


@router.post("/sdapi/v1/skip")
def skip(state: State, caller: Authorized) -> dict[str, Any]:
    """A1111's skip ends the current batch iteration and goes on to the next. Refinery renders all of a
    request's images as one batch, so there is no next iteration: skip is `/interrupt` (the image as it stands)."""
    return interrupt(state, caller)


@router.get("/sdapi/v1/sd-models")
def sd_models(state: State, _: Authorized) -> list[dict[str, Any]]:
    """The server's own base and refiner (with their A1111 hashes once loaded), then every checkpoint of the
    models folder, titled `name [hash10]` as A1111 titles them."""
    described = state.service.own_models
    rows = []
    for role in ("base", "refiner"):
        reference = getattr(state.settings, f"{role}_model")
        if role == "refiner" and reference == state.settings.base_model:
            continue  # one model serving both roles (the tiny pair) is one checkpoint, listed once
        short = described.get(f"{role}_hash")
        rows.append({"title": f"{reference} [{short}]" if short else reference,
                     "model_name": described.get(role, reference.split("/")[-1]), "hash": short, "sha256": None,
                     "filename": reference, "config": None})  # fmt: skip
    for entry in state.service.models_folder.scan()[0]:
        rows.append({"title": entry.title, "model_name": entry.name, "hash": entry.hash, "sha256": None,
                     "filename": str(entry.path), "config": None})  # fmt: skip
    return rows


@router.get("/sdapi/v1/samplers")
def samplers(_: Authorized) -> list[dict[str, Any]]:
    """Every sampler that runs, as A1111 lists them: name, aliases, options (its Automatic schedule)."""
    return a1111_samplers()


@router.get("/sdapi/v1/scripts")
def scripts(_: Authorized) -> dict[str, list[str]]:
    """No A1111 scripts or extensions run here; clients probe this to find out."""
    return {"txt2img": [], "img2img": []}
