"""The models folder over HTTP: what each checkpoint is, for pickers (the web page) and scripts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..security import Authorized
from ..state import State

router = APIRouter(tags=["checkpoints"])


@router.get("/v1/checkpoints")
def checkpoints(state: State, _: Authorized) -> dict[str, Any]:
    """`{default: {base, refiner}, checkpoints: [{name, title, role, layout, sampling, hash}], unusable:
    [{name, reason}]}`: a checkpoint's `name` is what `base_model` / `refiner_model` take."""
    entries, unusable = state.service.models_folder.scan()
    listed = [{key: value for key, value in entry.describe().items() if key != "path"} for entry in entries]
    refused = [{"name": item.name, "reason": item.reason} for item in unusable]
    own = {"base": state.settings.base_model, "refiner": state.settings.refiner_model}
    return {"default": own, "checkpoints": listed, "unusable": refused}
