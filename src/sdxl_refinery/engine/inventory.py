"""What models are where, how big they are, and whether a file holds every component.

Used by `refinery doctor`, `refinery models list` and `refinery models verify`.
Parameter counts come from the component configs built on PyTorch's meta
device: no weights are allocated.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from . import sgm_keys
from .single_file import CheckpointInfo, inspect_checkpoint, read_header, shipped_config
from .sources import ModelSource, SourceKind, check_sources, resolve, short_hash, weights_file
from .tiny import build_tiny_pair


def _meta_components(config: dict[str, Any]) -> dict[str, torch.nn.Module]:
    with init_empty_weights():
        parts: dict[str, torch.nn.Module] = {
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "vae": AutoencoderKL.from_config(config["vae"]),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
        }
        if "text_encoder" in config:
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))
    return parts


def parameter_counts(kind: str, config: dict[str, Any] | None = None) -> dict[str, int]:
    """Parameters of each component of `config`, by default shipped SDXL `kind` (`sdxl-base`, `sdxl-refiner`)."""
    parts = _meta_components(config or shipped_config(kind))
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}


def _folder_config(folder: Path) -> dict[str, Any]:
    """The component configs of a diffusers folder."""
    config = {}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        path = folder / component / "config.json"
        if path.is_file():
            config[component] = json.loads(path.read_text(encoding="utf-8"))
    return config


def configured_counts(base_model: str, refiner_model: str) -> tuple[dict[str, int], str]:
    """Parameters of the configured pair (base components, then the refiner's UNet; encoder 2 and the VAE are
    shared), and where the figures come from. Nothing is loaded: configs only, on the meta device.

    Raises:
        ModelLoadError: a reference cannot be resolved or its file is refused.
    """
    base, refiner = resolve(base_model, "base"), resolve(refiner_model, "refiner")
    check_sources(base, refiner)
    if base.kind is SourceKind.TINY:
        with tempfile.TemporaryDirectory(prefix="refinery-doctor-") as scratch:
            tiny_base, tiny_refiner = build_tiny_pair(Path(scratch))
        modules = {"unet": tiny_base.unet, "vae": tiny_base.vae, "text_encoder_2": tiny_base.text_encoder_2,
                   "text_encoder": tiny_base.text_encoder, "refiner unet": tiny_refiner.unet}  # fmt: skip
        return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}, (
            "the tiny random-weight pair"
        )
    (base_config, base_origin), (refiner_config, refiner_origin) = (
        _source_config(base, "sdxl-base"),
        _source_config(refiner, "sdxl-refiner"),
    )
    counts = parameter_counts("sdxl-base", base_config)
    counts["refiner unet"] = parameter_counts("sdxl-refiner", refiner_config)["unet"]
    return counts, f"base {base.describe()} ({base_origin}); refiner {refiner.describe()} ({refiner_origin})"


def _source_config(source: ModelSource, kind: str) -> tuple[dict[str, Any], str]:
    if source.kind is SourceKind.SINGLE_FILE:
        return inspect_checkpoint(Path(source.location)).config, "its file's header"
    if source.kind is SourceKind.FOLDER:
        return _folder_config(Path(source.location)), "its folder's configs"
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source.location, local_files_only=True, allow_patterns=["*.json"]))
        return _folder_config(folder), "its cached configs"
    except OSError:
        return shipped_config(kind), "SDXL 1.0's configs: not downloaded yet"


def expected_sgm_shapes(config: dict[str, Any], kind: str) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a complete single file of this config holds."""
    parts = _meta_components(config)
    state = {name: part.state_dict() for name, part in parts.items()}
    prefix = sgm_keys.OPEN_CLIP_REFINER_PREFIX if kind == "sdxl-refiner" else sgm_keys.OPEN_CLIP_BASE_PREFIX
    tensors = {
        **sgm_keys.unet_to_sgm(state["unet"], config["unet"]),
        **sgm_keys.vae_to_sgm(state["vae"], config["vae"]),
    }
    tensors.update(sgm_keys.open_clip_to_sgm(state["text_encoder_2"], prefix))
    if "text_encoder" in state:
        tensors.update(sgm_keys.clip_l_to_sgm(state["text_encoder"]))
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


@dataclass
class Verification:
    """The outcome of `verify`: what the model is and what, if anything, is wrong with it."""

    path: str
    kind: str
    hash: str | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: Path) -> Verification:
    """Check a single file or diffusers folder holds a complete SDXL base or refiner.

    Raises:
        ModelLoadError: the path is missing, or not an SDXL checkpoint at all.
    """
    if path.is_dir():
        index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").is_file() else {}
        kind = "sdxl-refiner" if index.get("_class_name") == "StableDiffusionXLImg2ImgPipeline" else "sdxl-base"
        problems = []
        for part in ("unet", "vae", "text_encoder_2", "scheduler", "tokenizer_2") + (
            ("text_encoder", "tokenizer") if kind == "sdxl-base" else ()
        ):
            if not (path / part).is_dir():
                problems.append(f"component {part} is missing")
        unet = weights_file(path)
        return Verification(str(path), f"{kind} (diffusers folder)", short_hash(unet) if unet else None, problems)
    info = inspect_checkpoint(path)
    problems = tensor_problems(path, info)
    sampling = "" if info.sampling.is_default else f", {info.sampling.describe()} from its {info.sampling.source}"
    return Verification(str(path), f"{info.kind} (single file, {info.tensors} tensors{sampling})", short_hash(path),
                        problems)  # fmt: skip


def tensor_problems(path: Path, info: CheckpointInfo) -> list[str]:
    """Tensors a single file lacks, or holds in the wrong shape, against its kind's configs (header only;
    at most 20 of each)."""
    header = read_header(path)
    expected = expected_sgm_shapes(info.config, info.kind)
    found = {key: tuple(entry["shape"]) for key, entry in header.items() if key != "__metadata__"}
    problems = [f"missing tensor {key}" for key in sorted(set(expected) - set(found))][:20]
    problems += [f"tensor {key} has shape {found[key]}, expected {shape}" for key, shape in expected.items()
                 if key in found and found[key] != shape][:20]  # fmt: skip
    return problems
