"""What the service's models are, known before they load: text encoder depth and cross-attention width.

Submissions are checked against these (a `clip_skip` too deep, a LoRA made for another model) while the
models are not loaded yet. The loaded engine's own figures win; before that, the tiny pair's constants or
the diffusers folders' configs, read once per model reference; else SDXL's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .engine.sources import SDXL_ENCODER_LAYERS, TINY_CONTEXT_DIM, TINY_ENCODER_LAYERS, TINY_NAME
from .loras import SDXL_CONTEXT_DIM


def _config_value(path: Path, key: str) -> Any:
    """`key` of a JSON config file, or None when the file is absent (or lacks it)."""
    return json.loads(path.read_text()).get(key) if path.is_file() else None


@functools.lru_cache(maxsize=32)
def encoder_layers(base_model: str, refiner_model: str) -> int:
    """Layers of the pair's shallowest text encoder, from its folders' configs (SDXL's when they say nothing)."""
    if base_model == TINY_NAME:
        return TINY_ENCODER_LAYERS
    base, refiner = Path(base_model), Path(refiner_model)
    configs = [base / "text_encoder" / "config.json", base / "text_encoder_2" / "config.json",
               refiner / "text_encoder_2" / "config.json"]  # fmt: skip
    depths = [int(depth) for config in configs if (depth := _config_value(config, "num_hidden_layers")) is not None]
    return min(depths, default=SDXL_ENCODER_LAYERS)


@functools.lru_cache(maxsize=32)
def context_width(base_model: str) -> int:
    """The base's cross-attention width (what a LoRA must be made for), from its UNet config; SDXL's if none."""
    if base_model == TINY_NAME:
        return TINY_CONTEXT_DIM
    width = _config_value(Path(base_model) / "unet" / "config.json", "cross_attention_dim")
    return int(width) if width is not None else SDXL_CONTEXT_DIM
