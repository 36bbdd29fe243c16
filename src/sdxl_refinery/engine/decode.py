"""Latents to pictures: one VAE decode, in tiles only when a whole one would not fit, again in fp32 on NaN/Inf."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from .memory import GIB, decode_bytes, free_bytes
from .passes import Pass
from .recovery import NonFinite, all_finite, upcast
from .tracking import BatchTracker

log = logging.getLogger(__name__)


@torch.no_grad()
def decode_pixels(vae: Any, latents: torch.Tensor, device: str) -> torch.Tensor:
    """Decode latents with `vae` in its current dtype (fp32 on CUDA); pixels in [-1, 1], unclamped."""
    latents = latents.to(device, vae.dtype)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std_t / vae.config.scaling_factor + mean_t
    else:
        latents = latents / vae.config.scaling_factor
    pixels: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    return pixels


def to_images(processor: Any, pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded pixels as PIL images, through the pipeline's own image processor."""
    images: list[Image.Image] = processor.postprocess(pixels.float(), output_type="pil")
    return images


@contextlib.contextmanager
def tiles_if_needed(vae: Any, latents: torch.Tensor, device: str) -> Iterator[bool]:
    """Decode in tiles for this run only when a whole decode would not fit in free memory (yields whether)."""
    images = 1 if vae.use_slicing else latents.shape[0]
    need = decode_bytes(latents.shape[3] * 8, latents.shape[2] * 8, images, vae.dtype.itemsize)
    free = free_bytes(device)
    if vae.use_tiling or need <= free:
        yield False
        return
    log.info("   VAE decode needs about %.1f GiB, %.1f GiB free: decoding in tiles", need / GIB, free / GIB)
    vae.enable_tiling()
    try:
        yield True
    finally:
        vae.disable_tiling()


def decode_checked(vae: Any, processor: Any, latents: torch.Tensor, device: str, recoveries: list[str]) -> list[Any]:
    """The images of `latents`; NaN/Inf in the pixels is decoded again with the VAE in fp32 (noted in
    `recoveries`).

    Raises:
        NonFinite: NaN/Inf even in fp32.
    """
    pixels = decode_pixels(vae, latents, device)
    if not all_finite(pixels):
        with upcast(vae) as changed:
            if changed:
                pixels = decode_pixels(vae, latents, device)
        if not all_finite(pixels):
            raise NonFinite("NaN/Inf in the decoded pixels")
        recoveries.append("NaN/Inf in the VAE decode; decoded again in fp32")
        log.warning("   NaN/Inf in the VAE decode: decoded again in fp32")
    return to_images(processor, pixels)


def decode_pass(
    run: Pass, tracker: BatchTracker, latents: torch.Tensor, vaes: tuple[Any, Any], processor: Any, device: str
) -> tuple[list[list[Image.Image] | None], bool]:
    """Each request's images (None for a cancelled one), and whether a decode was tiled.

    Args:
        vaes: the last stage's VAE, which decodes the requests that ran to the end together, and the base's,
            which decodes each interrupted request from the latents it kept, as a run of it alone would.
    """
    finished = [index for index in range(len(run.items)) if index not in tracker.gone]
    images: list[list[Image.Image] | None] = [None] * len(run.items)
    decode_tiled = False
    if finished:
        shares = torch.cat([latents[tracker.slices[index]] for index in finished])
        with tiles_if_needed(vaes[0], shares, device) as decode_tiled:
            decoded = decode_checked(vaes[0], processor, shares, device, run.recoveries)
        for index in finished:
            images[index], decoded = decoded[: run.counts[index]], decoded[run.counts[index] :]
    for index, kept in tracker.kept.items():
        with tiles_if_needed(vaes[1], kept, device) as tiled:
            images[index] = decode_checked(vaes[1], processor, kept, device, run.recoveries)
        decode_tiled = decode_tiled or tiled
    if run.edit is not None:  # inpainting: back into the original, unmasked pixels unchanged
        images = [[run.edit.finish(image) for image in own] if own else own for own in images]
    return images, decode_tiled
