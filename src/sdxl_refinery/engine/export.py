"""`refinery export`: diffusers folder <-> single SGM-layout .safetensors file.

Export renames each component's tensors to the original layout (`sgm_keys`)
and embeds the component configs in the file's header, so the file loads
offline here and in any tool that reads SDXL single files. Import loads a
single file (`single_file`) and saves it as a diffusers folder.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError, StorageError
from . import sgm_keys
from .single_file import CONFIG_METADATA_KEY, inspect_checkpoint, materialize_config

_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _component(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    for weights in _WEIGHT_FILES:
        if (folder / name / weights).is_file():
            config = json.loads((folder / name / "config.json").read_text())
            return load_file(folder / name / weights), config
    raise ModelLoadError(f"{folder}: component {name} has no safetensors weights ({', '.join(_WEIGHT_FILES)})")


def _json_or_empty(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _tokenizer_settings(folder: Path, name: str) -> dict[str, Any]:
    """pad token and length, plus the vocabulary itself when it is not CLIP's standard one."""
    target = folder / name
    config = (
        json.loads((target / "tokenizer_config.json").read_text())
        if (target / "tokenizer_config.json").is_file()
        else {}
    )
    special = (
        json.loads((target / "special_tokens_map.json").read_text())
        if (target / "special_tokens_map.json").is_file()
        else {}
    )
    pad = special.get("pad_token", config.get("pad_token", "<|endoftext|>"))
    settings: dict[str, Any] = {"pad_token": pad["content"] if isinstance(pad, dict) else pad,
                                "model_max_length": int(config.get("model_max_length", 77))}  # fmt: skip
    vocab, merges = _vocabulary(target)
    shipped = resources.files(__package__).joinpath("configs", "clip_tokenizer", "vocab.json")
    if vocab != json.loads(shipped.read_text(encoding="utf-8")):
        merges_text = "#version: 0.2\n" + "".join(f"{merge}\n" for merge in merges)
        settings["files"] = {"vocab.json": json.dumps(vocab, ensure_ascii=False), "merges.txt": merges_text}
    return settings


def _vocabulary(folder: Path) -> tuple[dict[str, int], list[str]]:
    """A CLIP BPE vocabulary and merges, from vocab.json + merges.txt or a tokenizers tokenizer.json."""
    if (folder / "vocab.json").is_file():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        return vocab, [line for line in lines if line and not line.startswith("#version")]
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return model["vocab"], merges


def export_to_single_file(folder: Path, output: Path) -> str:
    """Write a diffusers SDXL base or refiner folder as one SGM-layout safetensors file.

    Returns:
        The kind written: `sdxl-base` or `sdxl-refiner`.

    Raises:
        ModelLoadError: the folder is not an SDXL base or refiner.
        StorageError: the file cannot be written (nothing partial is left).
    """
    index = json.loads((folder / "model_index.json").read_text())
    is_refiner = index.get("_class_name") == "StableDiffusionXLImg2ImgPipeline" or index.get("text_encoder") in (
        None, [None, None])  # fmt: skip
    kind = "sdxl-refiner" if is_refiner else "sdxl-base"
    unet, unet_config = _component(folder, "unet")
    vae, vae_config = _component(folder, "vae")
    encoder_2, encoder_2_config = _component(folder, "text_encoder_2")
    tensors = {**sgm_keys.unet_to_sgm(unet, unet_config), **sgm_keys.vae_to_sgm(vae, vae_config)}
    prefix = sgm_keys.OPEN_CLIP_REFINER_PREFIX if is_refiner else sgm_keys.OPEN_CLIP_BASE_PREFIX
    tensors.update(sgm_keys.open_clip_to_sgm(encoder_2, prefix))
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config: dict[str, Any] = {"kind": kind, "model_index": index, "unet": unet_config, "vae": vae_config,
                              "text_encoder_2": encoder_2_config, "scheduler": scheduler,
                              "tokenizer_2": _tokenizer_settings(folder, "tokenizer_2")}  # fmt: skip
    if not is_refiner:
        encoder, encoder_config = _component(folder, "text_encoder")
        tensors.update(sgm_keys.clip_l_to_sgm(encoder))
        config["text_encoder"] = encoder_config
        config["tokenizer"] = _tokenizer_settings(folder, "tokenizer")
    _save_atomically({k: v.contiguous() for k, v in tensors.items()}, output, {CONFIG_METADATA_KEY: json.dumps(config)})
    return kind


def _save_atomically(tensors: dict[str, torch.Tensor], output: Path, metadata: dict[str, str]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, output)
    except OSError as error:
        raise StorageError(f"could not write {output}: {error.strerror or error}") from error
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def import_single_file(path: Path, output: Path) -> str:
    """Load a single-file SDXL checkpoint offline and save it as a diffusers folder.

    Returns:
        The kind read: `sdxl-base` or `sdxl-refiner`.

    Raises:
        ModelLoadError: the file is not an SDXL base or refiner checkpoint.
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    info = inspect_checkpoint(path)
    pipeline_class = StableDiffusionXLPipeline if info.kind == "sdxl-base" else StableDiffusionXLImg2ImgPipeline
    with tempfile.TemporaryDirectory(prefix="refinery-config-") as scratch:
        config_folder = materialize_config(info.config, Path(scratch))
        pipe = pipeline_class.from_single_file(str(path), config=str(config_folder), local_files_only=True)
    pipe.save_pretrained(output, safe_serialization=True)
    return info.kind
