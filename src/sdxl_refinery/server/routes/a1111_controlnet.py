"""The A1111 ControlNet extension's API: units in `alwayson_scripts.controlnet.args` (as `webuiapi` and
automation scripts send them), and its routes: `/controlnet/model_list`, `/controlnet/module_list`,
`/controlnet/version`, `/controlnet/detect`.

A unit's `model` may carry A1111's hash suffix (`name [abcd1234]`); it is matched without it. `pixel_perfect`,
`processor_res` and `low_vram` have no effect: maps are always made at the image's own size (pixel perfect).
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ...control import SLIDERS_A, SLIDERS_B, ControlUnit
from ...errors import InvalidRequest
from ...input_images import http_input_image
from ..offload import json_body_schema, off_loop, parsed_body
from ..security import Authorized
from ..state import State

router = APIRouter(tags=["a1111"])
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,}\]\s*$")
_UNIT_FIELDS = ("weight", "guidance_start", "guidance_end", "control_mode", "resize_mode", "threshold_a",
                "threshold_b")  # fmt: skip


def controlnet_units(scripts: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The enabled units of `alwayson_scripts`'s ControlNet entry (any case), as request `controlnets`, and the
    IP-Adapter units among them (module `ip-adapter...`, as the extension runs IP-Adapters) as `image_prompts`.

    Raises:
        InvalidRequest: naming `alwayson_scripts.controlnet.args.N.FIELD`.
    """
    entry = next((value for key, value in scripts.items() if key.lower() == "controlnet"), None)
    if entry is None:
        return [], []
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet.args", "must be a list of ControlNet units")
    units, prompts = [], []
    for index, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args.{index}"
        if not isinstance(unit, dict):
            raise InvalidRequest(where, "must be a ControlNet unit (an object)")
        if not unit.get("enabled", True):
            continue
        model = _HASH_SUFFIX.sub("", str(unit.get("model") or "")).strip()
        if model.lower() in ("", "none"):
            raise InvalidRequest(f"{where}.model", "an enabled unit needs a model (GET /controlnet/model_list)")
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # the extension's {image, mask} form
            image = image.get("image")
        if not image:
            raise InvalidRequest(f"{where}.image", "an enabled unit needs a control image (base64)")
        try:
            decoded = http_input_image(image)
        except ValueError as error:
            raise InvalidRequest(f"{where}.image", str(error)) from None
        module = str(unit.get("module") or "none")
        if module.lower().startswith("ip-adapter"):
            prompts.append({"model": model, "image": decoded, "weight": unit.get("weight", 1.0)})
            continue
        fields = {name: unit[name] for name in _UNIT_FIELDS if unit.get(name) is not None}
        for slider in ("threshold_a", "threshold_b"):  # the extension's -1: the preprocessor's default
            if isinstance(fields.get(slider), (int, float)) and fields[slider] < 0:
                del fields[slider]
        units.append({"model": model, "image": decoded, "preprocessor": module, **fields})
    return units, prompts


@router.get("/controlnet/version")
def version(_: Authorized) -> dict[str, int]:
    """The extension's API version that clients check for (2: units in alwayson_scripts)."""
    return {"version": 2}


@router.get("/controlnet/model_list")
def model_list(state: State, _: Authorized) -> dict[str, list[str]]:
    """The usable ControlNets of the folder, by name."""
    width = state.service.base_context_width()
    return {"model_list": [entry.name for entry in state.service.controlnet_folder.entries(width)
                           if entry.reason is None]}  # fmt: skip


@router.get("/controlnet/module_list")
def module_list(state: State, _: Authorized) -> dict[str, Any]:
    """The preprocessors Refinery runs now: the image-processing ones, and the depth and pose estimators whose
    models are in the annotator folder."""
    modules = state.service.annotator_folder.runnable()

    def sliders(name: str) -> list[dict[str, Any]]:
        found = [table[name] for table in (SLIDERS_A, SLIDERS_B) if name in table]
        return [{"name": label, "value": value, "min": low, "max": high} for label, value, low, high in found]

    return {"module_list": modules, "module_detail": {name: {"sliders": sliders(name)} for name in modules}}


class DetectRequest(BaseModel):
    """The extension's `/controlnet/detect` body."""

    model_config = ConfigDict(extra="ignore")

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_images: list[str] = Field(default_factory=list)  # webuiapi's name for the same
    controlnet_threshold_a: float | None = None  # None or negative (the extension's -1): the module's default
    controlnet_threshold_b: float | None = None


def _slider(value: float | None) -> float | None:
    """A slider of the extension's API: negative means the preprocessor's default (None)."""
    return None if value is None or value < 0 else value


@router.post("/controlnet/detect", openapi_extra=json_body_schema(DetectRequest))
async def detect(state: State, http: Request, _: Authorized) -> dict[str, Any]:
    """Each image preprocessed into its control map (at its own size), base64 PNG."""
    body = await parsed_body(http, DetectRequest, state.checks)

    def maps() -> list[str]:
        texts = body.controlnet_input_images or body.controlnet_images
        answers = []
        for index, text in enumerate(texts):
            try:
                unit = ControlUnit(model="-", image=http_input_image(text), preprocessor=body.controlnet_module,
                                   threshold_a=_slider(body.controlnet_threshold_a),
                                   threshold_b=_slider(body.controlnet_threshold_b),
                                   resize_mode="Just resize")  # fmt: skip
            except ValueError as error:
                raise InvalidRequest(f"controlnet_input_images.{index}", str(error)) from None
            assert unit.image is not None
            buffer = io.BytesIO()
            map_ = state.service.control_map(unit, unit.image.width, unit.image.height, "controlnet_module")
            map_.save(buffer, format="PNG")
            answers.append(base64.b64encode(buffer.getvalue()).decode())
        return answers

    return {"images": await off_loop(state.checks, maps), "info": "Success"}
