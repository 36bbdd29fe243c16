"""diffusers -> original SGM ("single file") key layout, for `refinery export`.

The other direction, loading, is diffusers' own `from_single_file`; the tests
check that this mapping is its exact inverse by a round trip on the tiny pair.
Names follow Stability's generative-models repository: the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, CLIP ViT-L under
`conditioner.embedders.0.transformer.`, OpenCLIP bigG under
`conditioner.embedders.{1 base, 0 refiner}.model.`.
"""

from __future__ import annotations

from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_BASE_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_REFINER_PREFIX = "conditioner.embedders.0.model."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
                "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


def _rename(key: str, prefixes: dict[str, str], inner: dict[str, str] | None = None) -> str | None:
    """Swap the longest matching prefix, then inner names (for resnets and attentions)."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old) :]
            if inner is not None:
                for name, replacement in inner.items():
                    if rest.startswith(name + "."):
                        rest = replacement + rest[len(name) :]
                        break
            return prefixes[old] + rest
    return None


def _unet_prefixes(config: dict[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
    """Block prefixes (diffusers -> SGM): plain ones, and resnet ones whose insides are renamed too."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    plain = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
             "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
             "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
             "mid_block.attentions.0.": "middle_block.1."}  # fmt: skip
    resnets = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    for level in range(levels):
        for j in range(per_level):
            block = (per_level + 1) * level + j + 1
            resnets[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            plain[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
        if level < levels - 1:
            plain[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(per_level + 1) * (level + 1)}.0.op."
        has_attention = "CrossAttn" in config["up_block_types"][level]
        for j in range(per_level + 1):
            block = (per_level + 1) * level + j
            resnets[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            plain[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            block = (per_level + 1) * level + per_level
            plain[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{block}.{2 if has_attention else 1}."
    return plain, resnets


def unet_to_sgm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers SDXL UNet state dict to SGM keys.

    Raises:
        ValueError: a key the SDXL layout does not know (not an SDXL UNet).
    """
    plain, resnets = _unet_prefixes(config)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, resnets, _UNET_RESNET) or _rename(key, plain)
        if new is None:
            raise ValueError(f"UNet key {key!r} has no SGM name")
        out[UNET_PREFIX + new] = tensor
    return out


def vae_to_sgm(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to SGM keys (attention weights as 1x1 convs).

    Raises:
        ValueError: a key the SDXL VAE layout does not know.
    """
    levels = len(config["block_out_channels"])
    plain = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
             "encoder.conv_in.": "encoder.conv_in.", "encoder.conv_out.": "encoder.conv_out.",
             "decoder.conv_in.": "decoder.conv_in.", "decoder.conv_out.": "decoder.conv_out.",
             "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}  # fmt: skip
    resnets: dict[str, str] = {}
    for part in ("encoder", "decoder"):
        resnets[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        resnets[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    for level in range(levels):
        for j in range(config["layers_per_block"] + 1):
            resnets[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
            resnets[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{levels - 1 - level}.block.{j}."
        plain[f"encoder.down_blocks.{level}.downsamplers.0."] = f"encoder.down.{level}.downsample."
        plain[f"decoder.up_blocks.{level}.upsamplers.0."] = f"decoder.up.{levels - 1 - level}.upsample."
    attentions = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, resnets, {"conv_shortcut": "nin_shortcut"}) or _rename(key, plain)
        if new is None:
            new = _rename(key, attentions, _VAE_ATTENTION)
            if new is not None and new.endswith(".weight") and tensor.ndim == 2 and ".norm." not in new:
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        if new is None:
            raise ValueError(f"VAE key {key!r} has no SGM name")
        out[VAE_PREFIX + new] = tensor
    return out


def clip_l_to_sgm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP ViT-L keeps its transformers names (`text_model.` included) under the embedder prefix."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        # transformers 5 saves CLIPTextModel without its `text_model.` prefix; SGM files carry it.
        out[CLIP_L_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = tensor
    return out


def open_clip_to_sgm(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPTextModelWithProjection to OpenCLIP keys (fused qkv, transposed projection).

    Raises:
        ValueError: a key OpenCLIP's layout does not know.
    """
    fixed = {"text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        if key in fixed:
            out[prefix + fixed[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
        elif key.startswith("text_model.encoder.layers."):
            layer, _, rest = key[len("text_model.encoder.layers.") :].partition(".")
            block = f"{prefix}transformer.resblocks.{layer}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                _, projection, kind = rest.split(".")
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[projection] = tensor
                continue
            new = _rename(rest, {name + ".": value + "." for name, value in _OPEN_CLIP_LAYER.items()})
            if new is None:
                raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP name")
            out[block + new] = tensor
        else:
            raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP name")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out
