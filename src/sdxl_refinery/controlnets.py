"""The ControlNet folder, read without any model: which entries are SDXL ControlNets, and why others are not.

Entries are diffusers folders (`config.json` and `diffusion_pytorch_model.safetensors`) and single
`.safetensors` files (diffusers' names or the original ControlNet names, judged from the header without
reading tensors), named by their path in the folder. A ControlNet fits the base when its cross-attention width
is the base's (2048 for SDXL; SD 1.x ControlNets have 768, SD 2.x 1024) and it takes SDXL's added time
embedding. Control-LoRAs, ControlNet-LLLite, Union models and T2I-Adapters are listed unusable, named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .loras import SDXL_CONTEXT_DIM, made_for, read_header

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


@dataclass(frozen=True)
class ControlNetEntry:
    """One entry of the ControlNet folder: a usable model (`reason` None) or why it cannot be used."""

    name: str
    path: Path
    context_width: int | None
    reason: str | None = None


def _folder_entry(name: str, folder: Path, context_width: int) -> ControlNetEntry:
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return ControlNetEntry(name, folder, None, f"config.json is not readable ({error})")
    if config.get("_class_name") not in ("ControlNetModel", "ControlNetUnionModel"):
        return ControlNetEntry(name, folder, None, f"a {config.get('_class_name')!r} folder, not a ControlNet")
    if config.get("_class_name") == "ControlNetUnionModel":
        return ControlNetEntry(name, folder, None, "a ControlNet Union model: not supported yet")
    width = int(config.get("cross_attention_dim") or 0)
    if width != context_width or config.get("addition_embed_type") != "text_time":
        return ControlNetEntry(name, folder, width, f"made for {made_for(width)}, not for this SDXL base model")
    if not any((folder / weights).is_file() for weights in WEIGHTS):
        files = ", ".join(sorted(path.name for path in folder.iterdir())[:8])
        return ControlNetEntry(name, folder, width, f"no diffusion_pytorch_model.safetensors (holds {files}; pickle "
                                                    ".bin weights are not loaded: they can run code)")  # fmt: skip
    return ControlNetEntry(name, folder, width)


# Other guidance models in the same folders, by a tensor name only they have.
FOREIGN = (
    ("lora_controlnet", "a Control-LoRA (Stability's): not supported"),
    ("lllite", "a ControlNet-LLLite (kohya's): not supported"),
    ("task_embedding", "a ControlNet Union model: not supported yet"),
    ("adapter.body.", "a T2I-Adapter, not a ControlNet"),
    ("body.0.resnets.", "a T2I-Adapter, not a ControlNet"),
)


def _file_entry(name: str, path: Path, context_width: int) -> ControlNetEntry:
    try:
        header = read_header(path, name)
    except InvalidRequest as error:
        return ControlNetEntry(name, path, None, error.rule)
    keys = {key.removeprefix("control_model.") for key in header if key != "__metadata__"}
    for mark, reason in FOREIGN:
        if any(mark in key for key in keys):
            return ControlNetEntry(name, path, None, reason)
    if not keys & {"controlnet_cond_embedding.conv_in.weight", "input_hint_block.0.weight"}:
        return ControlNetEntry(name, path, None, "not a ControlNet (no hint encoder: neither "
                                                 "controlnet_cond_embedding nor input_hint_block)")  # fmt: skip
    width = next((int(entry["shape"][1]) for key, entry in header.items()
                  if key.endswith("attn2.to_k.weight") and len(entry["shape"]) == 2), None)  # fmt: skip
    if width != context_width or not keys & {"add_embedding.linear_1.weight", "label_emb.0.0.weight"}:
        made = made_for(width) if width is not None else "a model without cross-attention"
        return ControlNetEntry(name, path, width, f"made for {made}, not for this SDXL base model")
    return ControlNetEntry(name, path, width)


@dataclass(frozen=True)
class ControlSource:
    """What a ControlNet unit runs with, found before any work: the model and its preprocessor's weights."""

    model: Path  # a diffusers folder or a single file
    annotator: Path | None = None  # the models of a depth or pose preprocessor (None: image processing)


class ControlNetFolder:
    """The ControlNet folder (`REFINERY_CONTROLNET_DIR`), judged entry by entry."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def entries(self, context_width: int = SDXL_CONTEXT_DIM) -> list[ControlNetEntry]:
        """Every diffusers folder and `.safetensors` file, sorted by name, usable or with its reason."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.rglob("*")):
            name = path.relative_to(self.folder).with_suffix("").as_posix()
            if path.is_dir() and (path / "config.json").is_file():
                found.append(_folder_entry(name, path, context_width))
            elif (
                path.is_file() and path.suffix.lower() == ".safetensors" and not (path.parent / "config.json").exists()
            ):
                found.append(_file_entry(name, path, context_width))
        return found

    def check(self, name: str, field: str, context_width: int = SDXL_CONTEXT_DIM) -> Path:
        """The folder (or single file) of a usable ControlNet named `name`.

        Raises:
            InvalidRequest: naming `field`: an unknown name, or an entry that cannot be used and why.
        """
        entries = self.entries(context_width)
        entry = next((entry for entry in entries if entry.name == name), None)
        if entry is None:
            usable = [entry.name for entry in entries if entry.reason is None]
            known = f"known: {', '.join(usable[:20])}" if usable else "the ControlNet folder holds none"
            raise InvalidRequest(field, f"no ControlNet {name!r}; {known} (GET /controlnet/model_list)")
        if entry.reason is not None:
            raise InvalidRequest(field, f"ControlNet {name!r} cannot be used: {entry.reason}")
        return entry.path
