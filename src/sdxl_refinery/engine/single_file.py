"""Single-file SDXL checkpoints (SGM key layout, .safetensors), with no network at all.

diffusers' `from_single_file` needs a diffusers-format config folder; by
default it fetches one from the Hub. Refinery materialises that folder from
configs shipped in this package (SDXL base and refiner 1.0, the CLIP tokenizer
vocabulary), or from the configs `refinery export` embeds in a file's header,
so loading never touches the network.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError

CONFIG_METADATA_KEY = "refinery.config"
PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
_KIND_MARKERS = {
    "sdxl-base": ("conditioner.embedders.1.model.positional_embedding", "model.diffusion_model.label_emb.0.0.weight"),
    "sdxl-refiner": ("conditioner.embedders.0.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"),
}


# Keys by which fine-tunes mark a sampling variant (NoobAI-XL V-Pred and others carry empty `v_pred` and
# `ztsnr` tensors, which ComfyUI and Forge read).
_UNSAMPLED_VARIANTS = {"v_pred", "ztsnr"}


@dataclass(frozen=True)
class CheckpointInfo:
    """What a single file holds, read from its header alone.

    Attributes:
        kind: `sdxl-base` or `sdxl-refiner`.
        config: component configs (the shipped SDXL ones or those embedded by export).
        tensors: number of tensors in the file.
    """

    kind: str
    config: dict[str, Any]
    tensors: int


def shipped_config(kind: str) -> dict[str, Any]:
    """The packaged diffusers configs of SDXL base or refiner 1.0."""
    text = resources.files(__package__).joinpath("configs", f"{kind}-1.0.json").read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check the file holds every byte it announces."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        raw_length = stream.read(8)
        if len(raw_length) < 8:
            raise ModelLoadError(f"{path}: truncated or empty file ({size} bytes), not a safetensors checkpoint")
        (length,) = struct.unpack("<Q", raw_length)
        if length > min(size - 8, 100_000_000):
            raise ModelLoadError(f"{path}: not a safetensors file (header length {length} does not fit the file)")
        try:
            header: dict[str, Any] = json.loads(stream.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelLoadError(f"{path}: not a safetensors file (unreadable header)") from error
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ModelLoadError(f"{path}: truncated: the header announces {8 + length + end} bytes, the file has {size}")
    return header


def _describe_foreign(keys: set[str]) -> str:
    """Name what a non-SDXL file most likely is, for the refusal message."""
    if any("lora_" in key or ".lora_down." in key or ".lora_A." in key for key in keys):
        return "a LoRA (low-rank adapter), not a full checkpoint"
    if any(key.startswith("cond_stage_model.") for key in keys):
        return "a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model text encoder), not SDXL"
    if keys and all(key.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv", "first_stage_model."))
                    for key in keys):  # fmt: skip
        return "a VAE alone, not a full checkpoint"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "a diffusion model without SDXL's text encoders"
    return f"an unknown model ({len(keys)} tensors, none of SDXL's)"


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Classify a single file as SDXL base or refiner from its header, or refuse it.

    Raises:
        ModelLoadError: missing file, pickle file, truncated or foreign file,
            each with a message saying what was found.
    """
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: refused: pickle checkpoints ({path.suffix}) can run arbitrary code when loaded, so Refinery "
            "loads .safetensors only; convert it once with a tool you trust, or download the .safetensors release"
        )
    header = read_header(path)
    metadata = header.pop("__metadata__", {}) or {}
    keys = set(header)
    if marked := sorted(keys & _UNSAMPLED_VARIANTS):
        # Sampled as epsilon-prediction, such a file gives a wrong image every time: refused, not guessed.
        what = f"a v-prediction / zero-terminal-SNR fine-tune (its {', '.join(marked)} key)"
        raise ModelLoadError(f"{path}: refused: {what}, which Refinery cannot sample correctly yet; its images "
                             "would all be wrong")  # fmt: skip
    for kind, markers in _KIND_MARKERS.items():
        if all(marker in keys for marker in markers):
            embedded = metadata.get(CONFIG_METADATA_KEY)
            config = json.loads(embedded) if embedded else shipped_config(kind)
            return CheckpointInfo(kind, config, len(keys))
    raise ModelLoadError(f"{path}: not an SDXL base or refiner checkpoint: found {_describe_foreign(keys)}")


def materialize_config(config: dict[str, Any], folder: Path) -> Path:
    """Write `config` as a diffusers config folder (configs and tokenizer files, no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(config["model_index"]))
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if component in config:
            (folder / component).mkdir(exist_ok=True)
            (folder / component / "config.json").write_text(json.dumps(config[component]))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config["scheduler"]))
    shipped = resources.files(__package__).joinpath("configs", "clip_tokenizer")
    for name in ("tokenizer", "tokenizer_2"):
        if name not in config:
            continue
        target = folder / name
        target.mkdir(exist_ok=True)
        settings = dict(config[name])
        files = settings.pop("files", None)  # a non-standard vocabulary embedded by export (the tiny pair's)
        for filename in ("vocab.json", "merges.txt"):
            if files is not None:
                (target / filename).write_text(files[filename], encoding="utf-8")
            else:
                with resources.as_file(shipped.joinpath(filename)) as source:
                    shutil.copyfile(source, target / filename)
        (target / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **settings}))
    return folder
