"""Single-file SDXL ControlNets: one `.safetensors` file, no config.

Two key layouts are in use: diffusers' own names saved in one file (lllyasviel's `diffusers_xl_*`, most
community SDXL ControlNets) and the original ControlNet names (`input_blocks`, `zero_convs`,
`input_hint_block`, `middle_block_out`, sometimes under `control_model.`). The original layout is renamed by
diffusers' own converter; its SDXL added embedding (`label_emb`), which that converter leaves out, by
diffusers' own mapping table.

No config ships with such a file, so the architecture is read from the tensors' shapes (blocks, channels,
layers, transformer depth, the hint encoder) and what shapes cannot say (attention heads, norm groups, the time
embedding's settings) is the base's own: an SDXL ControlNet is a copy of its base UNet's encoder
(diffusers' `ControlNetModel.from_unet`). A file that still does not fit is refused naming the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from diffusers import ControlNetModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING, convert_controlnet_checkpoint
from safetensors.torch import load_file

from ..errors import ModelLoadError

LDM_PREFIX = "control_model."
DIFFUSERS_MARK = "controlnet_cond_embedding.conv_in.weight"
SDXL_HEAD_CHANNELS = 64  # SDXL's attention head width, for blocks the base does not have
# UNet settings a ControlNet copies from its base (diffusers' from_unet) that its tensors do not show.
FROM_BASE = ("encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
             "flip_sin_to_cos", "freq_shift", "only_cross_attention", "downsample_padding", "mid_block_scale_factor",
             "act_fn", "norm_num_groups", "norm_eps", "class_embed_type", "num_class_embeds", "upcast_attention",
             "resnet_time_scale_shift")  # fmt: skip

Value = TypeVar("Value")


def diffusers_layout(state: Mapping[str, Value]) -> dict[str, Value]:
    """The file's tensors under diffusers' ControlNet names (a diffusers-layout file unchanged)."""
    state = {key.removeprefix(LDM_PREFIX): value for key, value in state.items()}
    if DIFFUSERS_MARK in state:
        return dict(state)
    downsampler = re.compile(r"input_blocks\.(\d+)\.0\.op\.weight$")
    downsamplers = sorted(int(match.group(1)) for key in state if (match := downsampler.match(key)))
    inputs = {int(key.split(".")[1]) for key in state if key.startswith("input_blocks.")}
    layers_per_block = downsamplers[0] - 1 if downsamplers else max(inputs, default=1)
    converted: dict[str, Value] = convert_controlnet_checkpoint(state, {"layers_per_block": layers_per_block})
    for diffusers_key, ldm_key in DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"].items():
        if ldm_key in state:
            converted[diffusers_key] = state[ldm_key]
    return {key: value for key, value in converted.items() if value is not None}


def _indices(shapes: Mapping[str, Any], prefix: str, position: int) -> list[int]:
    """The distinct numbers at dot-separated `position` of the keys starting with `prefix`."""
    return sorted({int(key.split(".")[position]) for key in shapes if key.startswith(prefix)})


def config_from_shapes(shapes: Mapping[str, Sequence[int]], base: Mapping[str, Any]) -> dict[str, Any]:
    """A `ControlNetModel` config for tensors of these shapes (diffusers names), beside the base UNet `base`."""
    levels = _indices(shapes, "down_blocks.", 1)
    channels = [int(shapes[f"down_blocks.{level}.resnets.0.conv1.weight"][0]) for level in levels]
    attended = [bool(_indices(shapes, f"down_blocks.{level}.attentions.", 3)) for level in levels]
    depths = [len(_indices(shapes, f"down_blocks.{level}.attentions.0.transformer_blocks.", 5)) or 1
              for level in levels]  # fmt: skip
    base_heads = base.get("attention_head_dim") or 8
    base_heads = base_heads if isinstance(base_heads, (list, tuple)) else [base_heads] * len(base["block_out_channels"])
    heads_by_width = dict(zip(base["block_out_channels"], base_heads, strict=False))
    hint = [int(shapes[DIFFUSERS_MARK][0])] + [
        int(shapes[f"controlnet_cond_embedding.blocks.{index}.weight"][0])
        for index in _indices(shapes, "controlnet_cond_embedding.blocks.", 2)[1::2]
    ]
    proj_in = shapes.get(f"down_blocks.{attended.index(True)}.attentions.0.proj_in.weight") if any(attended) else None
    to_k = next((shape for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    added = shapes.get("add_embedding.linear_1.weight")
    config = {key: base[key] for key in FROM_BASE if key in base}
    config.update(
        in_channels=int(shapes["conv_in.weight"][1]),
        block_out_channels=channels,
        down_block_types=["CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in attended],
        layers_per_block=len(_indices(shapes, "down_blocks.0.resnets.", 3)),
        transformer_layers_per_block=depths,
        attention_head_dim=[heads_by_width.get(width, max(width // SDXL_HEAD_CHANNELS, 1)) for width in channels],
        num_attention_heads=None,
        cross_attention_dim=int(to_k[1]) if to_k is not None else base.get("cross_attention_dim"),
        use_linear_projection=proj_in is not None and len(proj_in) == 2,
        projection_class_embeddings_input_dim=int(added[1]) if added is not None else None,
        mid_block_type="UNetMidBlock2DCrossAttn" if _indices(shapes, "mid_block.attentions.", 2) else "UNetMidBlock2D",
        conditioning_channels=int(shapes[DIFFUSERS_MARK][1]),
        conditioning_embedding_out_channels=hint,
    )
    return config


def load_single_file(path: Path, base: Mapping[str, Any]) -> ControlNetModel:
    """The ControlNet of a single `.safetensors` file, in the file's dtype on the CPU.

    Raises:
        ModelLoadError: the file is unreadable, or its tensors are not those of the ControlNet its shapes
            describe (naming the first missing and unexpected ones).
    """
    try:
        state = diffusers_layout(load_file(str(path)))
        config = config_from_shapes({key: tuple(tensor.shape) for key, tensor in state.items()}, base)
    except (OSError, KeyError, IndexError, ValueError) as error:
        raise ModelLoadError(f"ControlNet file {path.name}: not readable as an SDXL ControlNet ({error!r})") from error
    # torch.device("meta") is this thread's own mode (accelerate's init_empty_weights patches every thread).
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(key for key in set(expected) & set(state) if expected[key].shape != state[key].shape)
    if missing or unexpected or wrong:
        raise ModelLoadError(f"ControlNet file {path.name}: its tensors do not form an SDXL ControlNet (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {wrong[:3]})")  # fmt: skip
    model.load_state_dict(state, strict=True, assign=True)
    return model
