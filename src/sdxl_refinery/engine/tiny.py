"""The tiny pair: random-weight SDXL-architecture base and refiner, built offline.

Same component classes and wiring as SDXL 1.0 (two CLIP text encoders,
`text_time` UNets, the refiner with 5 time ids and cross-attention on
text_encoder_2 only, an 8x VAE, Euler scheduler with SDXL's schedule), scaled
down so that a 50 + 30 step run takes about a second on a CPU. Its images are
noise: it exists to check an install end to end and to back the test suite.
Each component is seeded before it is built, so the pair is the same on every
machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .sources import TINY_ENCODER_LAYERS

# Different widths for the two encoders, as in SDXL (768 and 1280), so nothing can confuse one for the other.
_TEXT_HIDDEN = 32
_TEXT_HIDDEN_2 = 48
_TIME_EMBED = 8

# SDXL 1.0's scheduler settings (scheduler/scheduler_config.json of both repos).
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte-to-printable-character table (from OpenAI's CLIP)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


def write_tiny_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a character-level CLIP BPE vocabulary (514 tokens, no merges) and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    characters = list(_bytes_to_unicode().values())
    tokens = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(folder, pad_token="<|endoftext|>", model_max_length=77)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=TINY_ENCODER_LAYERS,
        vocab_size=len(tokenizer),
        hidden_act="gelu",
        projection_dim=hidden,
        max_position_embeddings=77,
    )


def _unet(cross_attention_dim: int, time_ids: int, in_channels: int = 4) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED + _TEXT_HIDDEN_2,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def _vae() -> AutoencoderKL:
    # Four blocks make it an 8x VAE like SDXL's, so latents have SDXL's shape ratio.
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def build_tiny_pair(workdir: Path) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    """Build the tiny base and refiner in memory, sharing text_encoder_2 and VAE.

    Args:
        workdir: a folder for the tokenizer files the builder writes.
    """
    tokenizer = write_tiny_tokenizer(workdir / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_text_config(tokenizer, _TEXT_HIDDEN))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer, _TEXT_HIDDEN_2))
    torch.manual_seed(2)
    base_unet = _unet(cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN_2, time_ids=6)
    torch.manual_seed(3)
    refiner_unet = _unet(cross_attention_dim=_TEXT_HIDDEN_2, time_ids=5)
    torch.manual_seed(4)
    vae = _vae()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=base_unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        unet=refiner_unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return base, refiner


def save_tiny_pair(folder: Path) -> tuple[Path, Path]:
    """Build the tiny pair and save it as two diffusers folders, `base` and `refiner`.

    Returns:
        The base and refiner folders.
    """
    base, refiner = build_tiny_pair(folder / ".build")
    base.save_pretrained(folder / "base", safe_serialization=True)
    refiner.save_pretrained(folder / "refiner", safe_serialization=True)
    return folder / "base", folder / "refiner"


def tiny_inpainting_unet() -> UNet2DConditionModel:
    """A tiny base UNet with SDXL inpainting's 9 input channels (latents, mask, masked-image latents)."""
    torch.manual_seed(5)
    return _unet(cross_attention_dim=_TEXT_HIDDEN + _TEXT_HIDDEN_2, time_ids=6, in_channels=9)
