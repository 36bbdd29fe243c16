"""The A1111 surface clients probe: options (read and written), and the lists of what is installed.

Lists say honestly what Refinery has: an empty list where a feature is absent, never a fake entry
(webuiapi, SillyTavern and Open WebUI only need a list to iterate). `POST /sdapi/v1/options`
keeps what it is sent in `<data-dir>/a1111-options.json` and `GET` returns it; which keys take
effect is in docs/api.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ...errors import StorageError
from ..security import Authorized
from ..state import AppState, State
from .a1111 import a1111_error

router = APIRouter(tags=["a1111"])
OPTIONS_FILE = "a1111-options.json"
# A1111's own defaults of the options its clients read back; echoed until a client sets them.
A1111_DEFAULTS: dict[str, Any] = {
    "send_seed": True, "send_size": True, "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
    "eta_noise_seed_delta": 0, "sd_checkpoints_limit": 1, "show_progress_every_n_steps": 5,
}  # fmt: skip


def _options_path(state: AppState) -> Path:
    return state.settings.data_dir / OPTIONS_FILE


def _stored(state: AppState) -> dict[str, Any]:
    path = _options_path(state)
    if not path.exists():
        return {}
    stored: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return stored


def _store(state: AppState, options: dict[str, Any]) -> None:
    """Write the options atomically (temporary file, then rename)."""
    path = _options_path(state)
    handle, temporary = tempfile.mkstemp(prefix=f".{OPTIONS_FILE}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(options, stream, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        os.unlink(temporary)
        raise StorageError(f"could not store the A1111 options: {error.strerror or error}") from error


def _checkpoint(state: AppState) -> dict[str, Any]:
    """The base checkpoint as A1111 names it: title `name [hash10]`, name, file."""
    reference = state.settings.base_model
    short = state.service.describe().get("base_hash")
    return {"title": f"{reference} [{short}]" if short else reference, "model_name": reference.split("/")[-1],
            "hash": short, "filename": reference}  # fmt: skip


@router.get("/sdapi/v1/options")
def get_options(state: State, _: Authorized) -> dict[str, Any]:
    """A1111's defaults, what clients stored, and what Refinery runs (checkpoint, refiner)."""
    checkpoint = _checkpoint(state)
    return {**A1111_DEFAULTS, **_stored(state), "sd_model_checkpoint": checkpoint["title"],
            "sd_checkpoint_hash": checkpoint["hash"], "refiner_checkpoint": state.settings.refiner_model}  # fmt: skip


@router.post("/sdapi/v1/options", response_model=None)
def set_options(body: dict[str, Any], state: State, _: Authorized) -> JSONResponse | None:
    """Store the options sent. `sd_model_checkpoint` must name the loaded base checkpoint (one model is served)."""
    wanted = body.get("sd_model_checkpoint")
    if wanted is not None:
        names = {str(value) for value in _checkpoint(state).values() if value}
        if str(wanted) not in names:
            return a1111_error(404, "CheckpointNotFound", f"sd_model_checkpoint {wanted!r} is not a loaded checkpoint; "
                               f"this server runs {_checkpoint(state)['title']!r}")  # fmt: skip
    _store(state, {**_stored(state), **body})
    return None


@router.get("/sdapi/v1/schedulers")
def schedulers(_: Authorized) -> list[dict[str, Any]]:
    """The schedule types that work: the model's own (A1111's "Automatic")."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]


@router.get("/sdapi/v1/cmd-flags")
def cmd_flags(state: State, _: Authorized) -> dict[str, Any]:
    """The A1111 command-line flags that describe this server."""
    return {"api": True, "nowebui": False, "api_auth": None, "listen": state.settings.host not in ("127.0.0.1",
            "localhost", "::1"), "port": state.settings.port, "data_dir": str(state.settings.data_dir)}  # fmt: skip


@router.get("/sdapi/v1/embeddings")
def embeddings(_: Authorized) -> dict[str, dict[str, Any]]:
    """Textual inversion embeddings: none are loaded."""
    return {"loaded": {}, "skipped": {}}


def _absent(path: str, what: str) -> None:
    def route(_: Authorized) -> list[dict[str, Any]]:
        return []

    route.__doc__ = f"{what}: none installed (an empty list, as A1111 answers without any)."
    router.add_api_route(path, route, methods=["GET"], name=path.rsplit("/", 1)[-1])


for _path, _what in (
    ("/sdapi/v1/sd-vae", "VAE files besides the checkpoints' own"),
    ("/sdapi/v1/upscalers", "Upscalers"),
    ("/sdapi/v1/latent-upscale-modes", "Latent upscale modes"),
    ("/sdapi/v1/prompt-styles", "Prompt styles"),
    ("/sdapi/v1/loras", "LoRAs"),
    ("/sdapi/v1/hypernetworks", "Hypernetworks"),
    ("/sdapi/v1/face-restorers", "Face restorers"),
    ("/sdapi/v1/realesrgan-models", "Real-ESRGAN models"),
):
    _absent(_path, _what)
