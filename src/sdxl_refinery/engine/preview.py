"""Cheap live previews: SDXL latents to RGB by a fixed linear map, no VAE.

The factors are the linear fit of SDXL's latent channels to RGB that ComfyUI
and A1111 use for their "approx cheap" previews; a preview costs a tiny
matrix product, not a VAE decode.
"""

from __future__ import annotations

import torch
from PIL import Image

SDXL_LATENT_RGB_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)


def latents_to_preview(latents: torch.Tensor, index: int = 0) -> Image.Image:
    """Approximate one batch item of 4-channel SDXL latents as a small RGB image.

    Args:
        latents: tensor of shape (batch, 4, h, w), as the denoising loop holds it.
        index: which batch item to show.
    """
    factors = torch.tensor(SDXL_LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(SDXL_LATENT_RGB_BIAS, dtype=torch.float32)
    item = latents[index].detach().to("cpu", torch.float32)  # (4, h, w)
    rgb = torch.einsum("chw,cr->hwr", item, factors) + bias
    pixels = ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, mode="RGB")
