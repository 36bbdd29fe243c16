"""Model housekeeping for the faces: doctor, pull, list, verify, export.

Beside `service.py` on the door floor: the faces call these, and only these
reach into the engine, so the command line never imports the engine itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ModelLoadError

_PULL_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*onnx*", "*openvino*", "*flax*", "vae_1_0/*", "*.md"]


def _is_local(reference: str) -> bool:
    """Whether a reference can load with no network: tiny, a path, or a Hub id in the local cache."""
    if reference == "tiny" or Path(reference).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(reference, "model_index.json")
    return isinstance(found, str)


def check_models(base_model: str, refiner_model: str) -> None:
    """Refuse model references that cannot load, from paths and file headers alone: no torch, well under a
    second, so a typo fails at once instead of after loading everything else.

    Raises:
        ModelLoadError: no such file or folder, a pickle or foreign file, a checkpoint of the other role, or
            only one of the pair is `tiny`.
    """
    from .engine.sources import check_sources, resolve

    check_sources(resolve(base_model, "base"), resolve(refiner_model, "refiner"))


def download_notice(base_model: str, refiner_model: str) -> str | None:
    """What a run is about to download, said before it starts (None when everything is local, or when the
    Hub is switched off: the load then fails saying what to do)."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    missing = [reference for reference in (base_model, refiner_model) if not _is_local(reference)]
    if not missing or HF_HUB_OFFLINE:
        return None
    size = " (SDXL base + refiner 1.0: about 13 GB)" if len(missing) == 2 else ""
    return (f"Downloading {' and '.join(missing)} from the Hugging Face Hub{size} into {HF_HUB_CACHE}, once; "
            "later runs load from there. To try the install without it: --base tiny --refiner tiny.")  # fmt: skip


def doctor_report(settings: Settings) -> dict[str, Any]:
    """Device, precision policy and why, memory against need, models present, offline readiness.

    Raises:
        InvalidRequest: the configured device or precision is unknown or absent.
        ModelLoadError: a configured model reference cannot be resolved or its file is refused.
    """
    from .engine.memory import describe_plans

    report = describe_plans(settings.device, settings.precision, settings.speed(), settings.base_model,
                            settings.refiner_model)  # fmt: skip
    models = {"base": settings.base_model, "refiner": settings.refiner_model}
    present = {role: _is_local(reference) for role, reference in models.items()}
    return {
        **report,
        "models": models,
        "models_present": present,
        "offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        "offline_ready": all(present.values()),
        "models_folder": str(settings.models_folder()),
        "folder_models": folder_models(settings),
    }


def pull_models(settings: Settings, fp16: bool) -> list[str]:
    """Download base and refiner into huggingface_hub's cache (resumable), with progress bars.

    Returns:
        The local snapshot folders.

    Raises:
        ModelLoadError: a download failed or the network is off.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folders = []
    # fp16: keep only `*.fp16.safetensors` (skip names not ending in "6.safetensors"); else skip the fp16 copies.
    ignore = [*_PULL_IGNORE, "*[!6].safetensors" if fp16 else "*.fp16.safetensors"]
    for role, reference in (("base", settings.base_model), ("refiner", settings.refiner_model)):
        if reference == "tiny" or Path(reference).exists():
            folders.append(reference)
            continue
        try:
            folders.append(snapshot_download(reference, ignore_patterns=ignore))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
            raise ModelLoadError(f"{role} model {reference}: download failed: {error}") from error
    return folders


def folder_models(settings: Settings) -> list[dict[str, str]]:
    """The models folder as `models list` and `doctor` show it: each checkpoint's name and what it is (role,
    layout, sampling, hash), and each unusable file with the reason."""
    from .engine.catalog import ModelFolder

    entries, unusable = ModelFolder(settings.models_folder()).scan()
    rows = [{"role": entry.role, "reference": entry.name,
             "local": f"{entry.layout}, {entry.sampling}, hash {entry.hash or '?'}"} for entry in entries]  # fmt: skip
    rows += [{"role": "unusable", "reference": item.name, "local": item.reason} for item in unusable]
    return rows


def list_models(settings: Settings) -> list[dict[str, str]]:
    """The configured pair, the models folder, and every SDXL pipeline in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    rows = [{"role": role, "reference": ref, "local": "yes" if _is_local(ref) else "no"}
            for role, ref in (("base", settings.base_model), ("refiner", settings.refiner_model))]  # fmt: skip
    rows += folder_models(settings)
    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return rows
    for repo in cache.repos:
        if repo.repo_type == "model" and "xl" in repo.repo_id.lower():
            rows.append({"role": "cached", "reference": repo.repo_id, "local": f"{repo.size_on_disk / 1e9:.1f} GB"})
    return rows


def verify_model(path: Path) -> Any:
    """Kind, hash and component check of a single file or diffusers folder (see engine.inventory).

    Raises:
        ModelLoadError: the path is missing or not an SDXL checkpoint.
    """
    from .engine.inventory import verify

    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder")
    return verify(path)


def export_model(source: Path, target: Path) -> str:
    """A diffusers folder to one SGM .safetensors file, or a single file to a diffusers folder.

    Returns:
        What was written, in words.

    Raises:
        ModelLoadError: the source is not an SDXL base or refiner.
        StorageError: the target cannot be written.
    """
    from .engine.export import export_to_single_file, import_single_file

    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ModelLoadError(f"{source}: folder has no model_index.json, so it is no diffusers folder")
        kind = export_to_single_file(source, target)
        return f"{kind} single file {target}"
    kind = import_single_file(source, target)
    return f"{kind} diffusers folder {target}"
