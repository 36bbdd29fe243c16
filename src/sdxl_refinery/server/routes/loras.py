"""The LoRA folder over HTTP: the native listing and A1111's (`/sdapi/v1/loras`, what WebUI clients read)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ...errors import InvalidRequest
from ...loras import LoraFile, check_file
from ..security import Authorized
from ..state import AppState, State

router = APIRouter(tags=["loras"])


def _usable(state: AppState) -> tuple[list[LoraFile], dict[str, str]]:
    """The folder's LoRAs that pass the checks, and the others with the reason."""
    folder = state.service.lora_folder
    usable, unusable = [], {}
    for name in folder.names():
        try:
            usable.append(check_file(name, folder.path_of(name, allow_paths=False), context_width=None))
        except InvalidRequest as error:
            unusable[name] = error.rule
    return usable, unusable


@router.get("/v1/loras")
def loras(state: State, _: Authorized) -> dict[str, Any]:
    """LoRAs a request may name (`loras: [{name, weight}]` or `<lora:name:weight>` in the prompt), with
    A1111's 12-digit hash and the parts each changes; files that cannot be used, with the reason."""
    usable, unusable = _usable(state)
    rows = [{"name": lora.name, "hash": lora.short_hash, "parts": list(lora.parts)} for lora in usable]
    return {"loras": rows, "unusable": unusable}


@router.get("/sdapi/v1/loras")
def a1111_loras(state: State, _: Authorized) -> list[dict[str, Any]]:
    """A1111's shape: name, alias, path and the file's training metadata, for each usable LoRA."""
    usable, _unusable = _usable(state)
    return [{"name": lora.name, "alias": lora.name, "path": str(lora.path), "metadata": lora.metadata}
            for lora in usable]  # fmt: skip


@router.post("/sdapi/v1/refresh-loras")
def refresh_loras(_: Authorized) -> None:
    """A1111 rescans its LoRA folder here; Refinery reads the folder on every request, so nothing to do."""
