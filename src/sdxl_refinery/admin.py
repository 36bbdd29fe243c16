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
from .request import SpeedOptions

_PULL_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*onnx*", "*openvino*", "*flax*", "vae_1_0/*", "*.md"]
_BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "fp16": 2}


def _available_memory(device: str) -> tuple[str, int | None]:
    import torch

    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return "GPU memory free", int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return "RAM available", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "RAM available", None


def _is_local(reference: str) -> bool:
    """Whether a reference can load with no network: tiny, a path, or a Hub id in the local cache."""
    if reference == "tiny" or Path(reference).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(reference, "model_index.json")
    return isinstance(found, str)


def doctor_report(settings: Settings) -> dict[str, Any]:
    """Device, precision policy and why, memory against need, models present, offline readiness.

    Raises:
        InvalidRequest: the configured device or precision is unknown or absent.
    """
    from .engine.device import choose_placement
    from .engine.inventory import parameter_counts
    from .engine.memory import choose_plan, unet_working_bytes
    from .engine.speed import choose_speed_plan

    placement = choose_placement(settings.device, settings.precision)
    counts = {**parameter_counts("sdxl-base")}
    counts["refiner unet"] = parameter_counts("sdxl-refiner")["unet"]  # encoder 2 and VAE are shared
    dtype_name = placement.precision_name.split("+")[0]
    need = sum(counts.values()) * _BYTES_PER_PARAMETER[dtype_name]
    memory_label, available = _available_memory(placement.device)
    bytes_per_parameter = _BYTES_PER_PARAMETER[dtype_name]
    memory_plan = None
    if available is not None:
        largest = max(counts.values()) * bytes_per_parameter
        working = unet_working_bytes(1024, 1024, 1, bytes_per_parameter)
        memory_plan = choose_plan(placement.device, need, largest, working, available)[1]
    speed = SpeedOptions(settings.compile, settings.channels_last, settings.fused_qkv, settings.threads)
    models = {"base": settings.base_model, "refiner": settings.refiner_model}
    present = {role: _is_local(reference) for role, reference in models.items()}
    return {
        "device": placement.device,
        "precision": placement.precision_name,
        "why": placement.reason,
        "parameters": counts,
        "weights_bytes_needed": need,
        "memory_label": memory_label,
        "memory_available_bytes": available,
        "fits": None if available is None else available > need,
        "memory_plan": memory_plan,
        "speed_plan": choose_speed_plan(placement, speed).names(),
        "models": models,
        "models_present": present,
        "offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"),
        "offline_ready": all(present.values()),
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


def list_models(settings: Settings) -> list[dict[str, str]]:
    """The configured pair and every SDXL pipeline in the Hugging Face cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    rows = [{"role": role, "reference": ref, "local": "yes" if _is_local(ref) else "no"}
            for role, ref in (("base", settings.base_model), ("refiner", settings.refiner_model))]  # fmt: skip
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
