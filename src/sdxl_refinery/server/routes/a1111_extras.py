"""A1111's Extras API: upscale one image or a batch (`/sdapi/v1/extra-single-image`, `extra-batch-images`),
and read a PNG's generation text (`/sdapi/v1/png-info`).

Upscales are queued jobs like any other (durable, cancellable, with progress); these routes answer when the
job is done, as A1111 does. Face restoration (GFPGAN, CodeFormer) is not part of Refinery: a visibility above
0 is refused, naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
from typing import Any, Literal

from fastapi import APIRouter, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from ...errors import InvalidRequest
from ...input_images import http_input_image
from ...jobs.models import Job, JobStatus
from ...png import PARAMETERS_KEY, split_settings
from ...upscale_request import NONE, UpscaleRequest
from ..dedup import dedup_for
from ..keys import Caller
from ..offload import json_body_schema, off_loop, parsed_body
from ..security import Authorized
from ..state import AppState, State
from .a1111_settings import a1111_error

router = APIRouter(tags=["a1111"])
# Our field names as A1111's extras name them, for errors.
_A1111_NAMES = {"upscaler": "upscaler_1", "scale": "upscaling_resize", "width": "upscaling_resize_w",
                "height": "upscaling_resize_h", "crop": "upscaling_crop",
                "upscaler_2_visibility": "extras_upscaler_2_visibility", "images": "image"}  # fmt: skip


class _ExtrasBase(BaseModel):
    """A1111's extras fields (its `ExtrasBaseRequest`)."""

    model_config = ConfigDict(extra="ignore")

    resize_mode: Literal[0, 1] = Field(0, description="0: by upscaling_resize; 1: to upscaling_resize_w x _h.")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="Face restoration: not available (0 only).")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="Face restoration: not available (0 only).")
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, description="The factor (resize_mode 0).")
    upscaling_resize_w: int = Field(512, description="The width (resize_mode 1).")
    upscaling_resize_h: int = Field(512, description="The height (resize_mode 1).")
    upscaling_crop: bool = Field(True, description="Crop to the size's aspect ratio (resize_mode 1).")
    upscaler_1: str = NONE
    upscaler_2: str = NONE
    extras_upscaler_2_visibility: float = 0
    upscale_first: bool = False

    def to_request(self, images: list[Any]) -> UpscaleRequest:
        """The upscale this body asks for.

        Raises:
            InvalidRequest: naming the A1111 field and its rule.
        """
        for name in ("gfpgan_visibility", "codeformer_visibility"):
            if getattr(self, name) > 0:
                raise InvalidRequest(name, "face restoration (GFPGAN, CodeFormer) is not available in Refinery; "
                                           "send 0")  # fmt: skip
        to_size = self.resize_mode == 1
        try:
            return UpscaleRequest(
                images=images,
                upscaler=self.upscaler_1,
                scale=1.0 if to_size else self.upscaling_resize,
                width=self.upscaling_resize_w if to_size else 0,
                height=self.upscaling_resize_h if to_size else 0,
                crop=self.upscaling_crop,
                upscaler_2=self.upscaler_2,
                upscaler_2_visibility=self.extras_upscaler_2_visibility,
            )
        except InvalidRequest as error:
            field, _, rest = error.field.partition(".")
            raise InvalidRequest(_A1111_NAMES.get(field, field) + (f".{rest}" if rest else ""), error.rule) from None


class ExtrasSingleImage(_ExtrasBase):
    image: str = Field(description="The image, base64 (with or without a data: prefix).")


class _BatchItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data: str = Field(description="The image, base64.")
    name: str = ""


class ExtrasBatchImages(_ExtrasBase):
    imageList: list[_BatchItem] = Field(min_length=1, description="The images, each {data, name}.")


class PngInfoRequest(BaseModel):
    image: str = Field(description="A PNG, base64.")


def _decoded(texts: list[str], field: str) -> list[Any]:
    images = []
    for index, text in enumerate(texts):
        try:
            images.append(http_input_image(text))
        except ValueError as error:
            where = field if len(texts) == 1 else f"{field}.{index}"
            raise InvalidRequest(where, str(error)) from None
    return images


def _submit(body: _ExtrasBase, texts: list[str], field: str, state: AppState, http: Request, caller: Caller) -> Job:
    """Decode, check and queue the upscale: in a worker thread."""
    request = body.to_request(_decoded(texts, field))
    try:
        return state.submit(request, client="a1111", dedup=dedup_for(http, request, "a1111", True), caller=caller)
    except InvalidRequest as error:  # the upscaler folder's checks: named as A1111 names the field
        raise InvalidRequest(_A1111_NAMES.get(error.field, error.field), error.rule) from None


async def _upscaled(body: _ExtrasBase, texts: list[str], field: str, state: AppState, http: Request,
                    caller: Caller) -> tuple[list[str], str] | Any:  # fmt: skip
    """Queue the upscale, wait for it, and answer its images (base64) and html_info, or A1111's error shape."""
    job: Job = await off_loop(state.checks, _submit, body, texts, field, state, http, caller)
    job = await state.wait(job.id, state.settings.sync_wait_seconds)
    if job.status is JobStatus.SUCCEEDED and job.result is not None:
        names = job.result["images"] if body.show_extras_results else []
        datas = [await asyncio.to_thread(state.storage.read, job.id, name) for name in names]
        if not await http.is_disconnected():
            await asyncio.to_thread(state.store.mark_answered, job.id)
        info = await asyncio.to_thread(_parameters_of, datas[0]) if datas else ""
        return [base64.b64encode(data).decode() for data in datas], f"<p>{html.escape(info)}</p>"
    if job.status is JobStatus.FAILED:
        return a1111_error(500, "UpscaleFailed", f"job {job.id} failed: {job.error}", job_id=job.id)
    if job.status is JobStatus.CANCELLED:
        return a1111_error(409, "Cancelled", f"job {job.id} was cancelled", job_id=job.id)
    message = f"job {job.id} is still {job.status.value}; poll GET /v1/jobs/{job.id}"
    return a1111_error(504, "Timeout", message, job_id=job.id)


@router.post("/sdapi/v1/extra-single-image", openapi_extra=json_body_schema(ExtrasSingleImage))
async def extra_single_image(state: State, http: Request, caller: Authorized) -> Any:
    """Upscale one image: `{html_info, image}` when done."""
    body = await parsed_body(http, ExtrasSingleImage, state.checks)
    outcome = await _upscaled(body, [body.image], "image", state, http, caller)
    if not isinstance(outcome, tuple):
        return outcome
    images, info = outcome
    return {"html_info": info, "image": images[0] if images else ""}


@router.post("/sdapi/v1/extra-batch-images", openapi_extra=json_body_schema(ExtrasBatchImages))
async def extra_batch_images(state: State, http: Request, caller: Authorized) -> Any:
    """Upscale several images in one job: `{html_info, images}` when done."""
    body = await parsed_body(http, ExtrasBatchImages, state.checks)
    outcome = await _upscaled(body, [item.data for item in body.imageList], "imageList", state, http, caller)
    if not isinstance(outcome, tuple):
        return outcome
    images, info = outcome
    return {"html_info": info, "images": images}


def _parameters_of(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return str(image.info.get(PARAMETERS_KEY) or "")


def png_info_of(data: bytes) -> dict[str, Any]:
    """A1111's png-info answer: the `parameters` text, the other text chunks, and the text read into A1111's
    keys (Prompt, Negative prompt, each setting; Size as Size-1 and Size-2).

    Raises:
        InvalidRequest: field `image`: not an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            chunks = {str(key): str(value) for key, value in image.info.items() if isinstance(value, str)}
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidRequest("image", f"is not a readable image ({error})") from None
    text = chunks.pop(PARAMETERS_KEY, "")
    return {"info": text, "items": chunks, "parameters": a1111_fields(text) if text else {}}


def a1111_fields(text: str) -> dict[str, Any]:
    """A `parameters` text by A1111's keys, as its `parse_generation_parameters` gives them."""
    lines = text.strip().split("\n")
    settings = dict(split_settings(lines[-1])) if len(lines) > 1 or ": " in lines[-1] else {}
    words = lines[:-1] if settings else lines
    negative_at = next((i for i, line in enumerate(words) if line.startswith("Negative prompt: ")), len(words))
    fields: dict[str, Any] = {
        "Prompt": "\n".join(words[:negative_at]),
        "Negative prompt": "\n".join(words[negative_at:]).removeprefix("Negative prompt: "),
    }
    for key, value in settings.items():
        fields[key] = value
        if key == "Size" and "x" in value:
            fields["Size-1"], fields["Size-2"] = value.split("x", 1)
    return fields


@router.post("/sdapi/v1/png-info", openapi_extra=json_body_schema(PngInfoRequest))
async def png_info(state: State, http: Request, _: Authorized) -> dict[str, Any]:
    """The generation text of a PNG (ours or A1111's), as A1111 answers it."""
    body = await parsed_body(http, PngInfoRequest, state.checks)

    def read() -> dict[str, Any]:
        try:
            image = http_input_image(body.image)
        except ValueError as error:
            raise InvalidRequest("image", str(error)) from None
        return png_info_of(image.data)

    result: dict[str, Any] = await off_loop(state.checks, read)
    return result
