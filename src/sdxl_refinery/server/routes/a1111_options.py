"""The A1111 surface clients probe: options (read and written), and the lists of what is installed.

Lists say honestly what Refinery has: an empty list where a feature is absent, never a fake entry
(webuiapi, SillyTavern and Open WebUI only need a list to iterate). `POST /sdapi/v1/options`
keeps what it is sent (see `a1111_settings`) and `GET` returns it; which keys take effect is in
docs/api.md.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ...editing import HiresUpscaler
from ...samplers import a1111_schedulers
from ..security import Authorized
from ..state import State
from .a1111_settings import A1111_DEFAULTS, check_settings, check_shape, checkpoint, stored_options, update_options

router = APIRouter(tags=["a1111"])


@router.get("/sdapi/v1/options")
def get_options(state: State, _: Authorized) -> dict[str, Any]:
    """A1111's defaults, what clients stored, and what Refinery runs (checkpoint, refiner)."""
    served, stored = checkpoint(state), stored_options(state)
    chosen = state.service.models_folder.find(str(stored.get("sd_model_checkpoint") or "\0"))
    current = {"sd_model_checkpoint": chosen.title, "sd_checkpoint_hash": chosen.hash} if chosen else {
        "sd_model_checkpoint": served["title"], "sd_checkpoint_hash": served["hash"]}  # fmt: skip
    return {**A1111_DEFAULTS, **stored, **current, "refiner_checkpoint": state.settings.refiner_model}


@router.post("/sdapi/v1/options")
def set_options(body: dict[str, Any], state: State, _: Authorized) -> None:
    """Store the options sent; honoured ones apply to every later A1111 request.

    `sd_model_checkpoint` must name the server's own base or a checkpoint of its models folder (it becomes
    the base of every later A1111 request that names none) and `sd_vae` the checkpoint's own VAE, else 404;
    an honoured option out of its field's range (or a `CLIP_stop_at_last_layers` deeper than the text
    encoders), a value nested over 16 levels, or options over 256 KB stored are a 422 naming what broke.
    """
    check_shape(body)
    check_settings(state, body)
    update_options(state, body)


@router.get("/sdapi/v1/schedulers")
def schedulers(_: Authorized) -> list[dict[str, Any]]:
    """Every schedule type that runs, as A1111 lists them (which sampler supports which: docs/api.md)."""
    return a1111_schedulers()


@router.get("/sdapi/v1/cmd-flags")
def cmd_flags(state: State, _: Authorized) -> dict[str, Any]:
    """The A1111 command-line flags that describe this server."""
    return {"api": True, "nowebui": False, "api_auth": None, "listen": state.settings.host not in ("127.0.0.1",
            "localhost", "::1"), "port": state.settings.port, "data_dir": str(state.settings.data_dir)}  # fmt: skip


@router.get("/sdapi/v1/embeddings")
def embeddings(state: State, _: Authorized) -> dict[str, dict[str, Any]]:
    """The embeddings folder as A1111 lists it: SDXL embeddings `loaded` (shape: the two widths together,
    vectors), the others `skipped` (SD 1.x/2.x ones, and files that cannot be read)."""
    usable, unusable = state.service.embedding_folder.scan()
    loaded = {
        embedding.name: {
            "step": None,
            "sd_checkpoint": None,
            "sd_checkpoint_name": None,
            "shape": sum(embedding.widths),
            "vectors": embedding.vectors,
        }
        for embedding in usable
    }
    skipped = {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                      "vectors": None, "reason": reason} for name, reason in unusable.items()}  # fmt: skip
    return {"loaded": loaded, "skipped": skipped}


@router.post("/sdapi/v1/refresh-embeddings")
def refresh_embeddings(_: Authorized) -> None:
    """A1111 rescans its embeddings folder here; Refinery reads the folder on every request: nothing to do."""


@router.get("/sdapi/v1/latent-upscale-modes")
def latent_upscale_modes(_: Authorized) -> list[dict[str, str]]:
    """Hires fix's latent upscalers, by A1111's names."""
    return [{"name": upscaler.value} for upscaler in HiresUpscaler if upscaler.in_latent_space]


def _absent(path: str, what: str) -> None:
    def route(_: Authorized) -> list[dict[str, Any]]:
        return []

    route.__doc__ = f"{what}: none installed (an empty list, as A1111 answers without any)."
    router.add_api_route(path, route, methods=["GET"], name=path.rsplit("/", 1)[-1])


for _path, _what in (
    ("/sdapi/v1/sd-vae", "VAE files besides the checkpoints' own"),
    ("/sdapi/v1/prompt-styles", "Prompt styles"),
    ("/sdapi/v1/hypernetworks", "Hypernetworks"),
    ("/sdapi/v1/face-restorers", "Face restorers"),
    ("/sdapi/v1/realesrgan-models", "Real-ESRGAN models"),
):
    _absent(_path, _what)
