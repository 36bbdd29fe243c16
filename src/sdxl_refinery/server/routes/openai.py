"""OpenAI-compatible images API: generations, edits, variations and `GET /v1/models`.

The answer comes when the job is done. Past the server's wait limit the
answer is a 504 whose error names the job id, so the client can poll
`GET /v1/jobs/{id}` instead of losing the work.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.datastructures import FormData, UploadFile

from ...errors import InvalidRequest, StorageError
from ...input_images import InputImage
from ...jobs.models import Job, JobStatus
from ...jobs.storage import ImageStorage
from ...png import PARAMETERS_KEY, parse_parameters
from ...request import HIGH_QUALITY_GUIDANCE, STANDARD_GUIDANCE, GenerationRequest, invalid_request_from
from ..dedup import dedup_for
from ..keys import Caller
from ..offload import off_loop
from ..security import Authorized
from ..state import AppState, State

router = APIRouter(tags=["openai"])
MODEL_ID = "sdxl-refinery"
_HIGH_QUALITY = {"hd", "high"}
_STANDARD_QUALITY = {"standard", "medium", "low"}
_OPENAI_DEFAULT_QUALITY = "standard"


class ImagesRequest(BaseModel):
    """The OpenAI images request; fields OpenAI added later are accepted and ignored.

    Fields are optional so that what a client leaves out takes the request's own default.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    user: str | None = None

    def to_request(self, **extra: Any) -> GenerationRequest:
        """The `GenerationRequest` this body asks for (with `extra` request fields: an edit's images).

        `quality` hd/high asks for high-quality guidance, standard/medium/low for the standard
        one, and `auto` keeps the request's default (the high-quality recipe). Absent means
        OpenAI's own default, `standard` (DALL-E 3's), a fact of OpenAI's API, not a default of ours.

        Raises:
            InvalidRequest: a bad size (named `size`) or a field outside its rule.
        """
        fields: dict[str, Any] = {"prompt": self.prompt, **extra}
        if self.n is not None:
            fields["n"] = self.n
        if self.size not in (None, "auto"):
            fields["width"], fields["height"] = _size(self.size)
        quality = (self.quality or _OPENAI_DEFAULT_QUALITY).lower()
        if quality in _HIGH_QUALITY:
            fields["guidance_scale"] = HIGH_QUALITY_GUIDANCE
        elif quality in _STANDARD_QUALITY:
            fields["guidance_scale"] = STANDARD_GUIDANCE
        return GenerationRequest(**fields)


def _size(size: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size)
    if not match:
        raise InvalidRequest("size", f"must be WIDTHxHEIGHT such as 1024x1024, or auto, not {size[:40]!r}")
    return int(match.group(1)), int(match.group(2))


def openai_images(job: Job, body: ImagesRequest, storage: ImageStorage, url_of: Callable[[str], str]) -> dict[str, Any]:
    """A finished job as OpenAI's images response: `{created, data: [{b64_json | url, revised_prompt}]}`."""
    data = []
    for name in (job.result or {}).get("images", []):
        if body.response_format == "url":
            data.append({"url": url_of(name), "revised_prompt": body.prompt})
        else:
            data.append(
                {"b64_json": base64.b64encode(storage.read(job.id, name)).decode(), "revised_prompt": body.prompt}
            )
    return {"created": int(job.finished or time.time()), "data": data}


# Where a request field sits in OpenAI's request: errors name OpenAI's parameter.
_OPENAI_PARAMS = {"width": "size", "height": "size", "guidance_scale": "quality", "base_model": "model"}


def openai_param(field: str) -> str:
    """OpenAI's name for a request field (`width` is part of `size`)."""
    return _OPENAI_PARAMS.get(field, field)


def openai_error(
    status: int,
    message: str,
    kind: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """OpenAI's error body, `{"error": {message, type, param, code}}`, which its SDK reads."""
    error = {"message": message, "type": kind, "param": param, "code": code, **extra}
    return JSONResponse({"error": error}, status_code=status, headers=headers)


@router.post("/v1/images/generations")
async def generate(body: ImagesRequest, state: State, request: Request, caller: Authorized) -> JSONResponse:
    """Render `n` images; answers `{created, data: [{b64_json | url, revised_prompt}]}` when done."""
    return await _render(body, body.to_request(**_chosen_model(body)), state, request, caller)


@router.post("/v1/images/edits")
async def edit(state: State, request: Request, caller: Authorized) -> JSONResponse:
    """OpenAI's image edit (multipart): `image` (or one `image[]`), `prompt`, optional `mask` whose transparent
    pixels mark the area to redraw, `n`, `size`, `response_format`. With a mask the area is inpainted anew
    (strength 1); without one the whole image is redrawn at the default strength. Refined as every image is."""
    form = await request.form()
    body = _body(_form_fields(form))
    fields: dict[str, Any] = {"init_image": await _upload(state, form, "image"), **_chosen_model(body)}
    if form.get("mask") is not None:
        mask = await off_loop(state.checks, _transparent_is_edit, await _upload(state, form, "mask"))
        fields |= {"mask_image": mask, "strength": 1.0}
    return await _render(body, body.to_request(**fields), state, request, caller)


@router.post("/v1/images/variations")
async def variation(state: State, request: Request, caller: Authorized) -> JSONResponse:
    """OpenAI's variations (multipart `image`, `n`, `size`, `response_format`): img2img of the image at strength
    0.6, prompted by the prompt its PNG records (A1111's `parameters` or ours), else by `VARIATION_PROMPT`."""
    form = await request.form()
    image = await _upload(state, form, "image")
    prompt = await off_loop(state.checks, recorded_prompt, image) or VARIATION_PROMPT
    body = _body({**_form_fields(form), "prompt": prompt})
    fields = {"init_image": image, "strength": VARIATION_STRENGTH, **_chosen_model(body)}
    return await _render(body, body.to_request(**fields), state, request, caller)


def _chosen_model(body: ImagesRequest) -> dict[str, Any]:
    """`model` names a checkpoint of the models folder; OpenAI's own model ids (what clients send by default)
    and ours mean the server's own pair. An unknown name is refused at submission, as `model`."""
    model = (body.model or "").strip()
    if not model or model == MODEL_ID or model.startswith(_OPENAI_MODEL_PREFIXES):
        return {}
    return {"base_model": model}


_OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
VARIATION_PROMPT = "high quality, detailed"
VARIATION_STRENGTH = 0.6
_FORM_FIELDS = ("prompt", "model", "n", "size", "quality", "response_format", "user")


def _body(fields: dict[str, Any]) -> ImagesRequest:
    """Raises: InvalidRequest: a form field outside its rule (e.g. no prompt)."""
    try:
        return ImagesRequest(**fields)
    except ValidationError as error:
        raise invalid_request_from(error) from None


def _form_fields(form: FormData) -> dict[str, Any]:
    return {name: value for name in _FORM_FIELDS if isinstance(value := form.get(name), str)}


async def _upload(state: AppState, form: FormData, name: str) -> InputImage:
    """The one image uploaded as `name` (or `name[]`, as the SDK sends lists).

    Raises:
        InvalidRequest: naming the parameter: none, several, not a file, or not a readable image.
    """
    files = [*form.getlist(name), *form.getlist(f"{name}[]")]
    if len(files) != 1:
        raise InvalidRequest(name, f"must be one uploaded image file, not {len(files)}")
    upload = files[0]
    if not isinstance(upload, UploadFile):
        raise InvalidRequest(name, "must be an uploaded file (multipart/form-data), not text")
    try:
        return await off_loop(state.checks, InputImage.from_bytes, await upload.read())
    except ValueError as error:
        raise InvalidRequest(name, str(error)) from None


def _transparent_is_edit(mask: InputImage) -> InputImage:
    """OpenAI's mask (transparent = redraw) as the request's mask (white = redraw).

    Raises:
        InvalidRequest: `mask` has no transparency, so it marks nothing.
    """
    image = mask.open()
    if "A" not in image.getbands() and not (image.mode == "P" and "transparency" in image.info):
        raise InvalidRequest("mask", "must be a PNG with transparency: its fully transparent pixels mark the edit")
    alpha = image.convert("RGBA").getchannel("A")
    return InputImage.from_pil(alpha.point(lambda value: 255 - value))


def recorded_prompt(image: InputImage) -> str | None:
    """The prompt a PNG records in its `parameters` text, if any (a Refinery or A1111 image)."""
    text = image.open().info.get(PARAMETERS_KEY)
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        prompt = str(parse_parameters(text).get("prompt") or "").strip()
    except StorageError:  # a parameters text without a settings line: a bare prompt
        prompt = text.strip()
    return prompt or None


async def _render(
    body: ImagesRequest, generation: GenerationRequest, state: AppState, request: Request, caller: Caller
) -> JSONResponse:
    dedup = await off_loop(state.checks, dedup_for, request, generation, "openai", True)  # hashes images and all
    job = await off_loop(
        state.checks, functools.partial(state.submit, generation, client="openai", dedup=dedup, caller=caller)
    )
    job = await state.wait(job.id, state.settings.sync_wait_seconds)
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        url_of = functools.partial(state.image_url, str(request.base_url), job.id, signed=True)
        answer = JSONResponse(openai_images(job, body, state.storage, url_of))
        if not await request.is_disconnected():  # a retry of this call would render again
            await asyncio.to_thread(state.store.mark_answered, job.id)
        return answer
    if job.status.terminal:
        return openai_error(500, f"job {job.id} {job.status.value}: {job.error}", "server_error", "job_failed",
                            job_id=job.id)  # fmt: skip
    return openai_error(
        504, f"job {job.id} is still {job.status.value} after {state.settings.sync_wait_seconds:.0f} s; "
        f"poll GET /v1/jobs/{job.id} for the result", "timeout", "job_pending", job_id=job.id,
    )  # fmt: skip


@router.get("/v1/models")
def models(state: State, _: Authorized) -> dict[str, Any]:
    """The server's own pair (`sdxl-refinery`: SDXL base + refiner, as configured), then every base checkpoint of
    the models folder, by the name that picks it in `model`."""
    created = int(time.time())
    data = [{"id": MODEL_ID, "object": "model", "created": created, "owned_by": "refinery",
             "base": state.settings.base_model, "refiner": state.settings.refiner_model}]  # fmt: skip
    for entry in state.service.models_folder.scan()[0]:
        if entry.role in ("base", "inpainting"):
            data.append({"id": entry.name, "object": "model", "created": created, "owned_by": "refinery",
                         "base": entry.name, "refiner": state.settings.refiner_model, "kind": entry.role,
                         "sampling": entry.sampling, "hash": entry.hash})  # fmt: skip
    return {"object": "list", "data": data}
