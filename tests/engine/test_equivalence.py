"""The service's images equal diffusers' own pipelines driven by hand with the documented semantics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_refinery import GenerationRequest, ImageService

PROMPT = "a lighthouse on a cliff at dusk"


def _reference(base_dir: Path, refiner_dir: Path, mode: str, seeds: list[int]) -> np.ndarray:
    """What a diffusers user writes: base to latents, refiner on those latents, shared encoder 2 and VAE."""
    base = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        refiner_dir, text_encoder_2=base.text_encoder_2, vae=base.vae, torch_dtype=torch.float32
    )
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    common = {"guidance_scale": 8.0, "generator": generators}
    batch = {"prompt": [PROMPT] * len(seeds)}  # the refiner gets one prompt per latent
    if mode == "sequential":
        latents = base(
            **common,
            prompt=PROMPT,
            width=256,
            height=256,
            num_inference_steps=12,
            num_images_per_prompt=len(seeds),
            output_type="latent",
        ).images
        images = refiner(
            **common,
            **batch,
            image=latents,
            strength=0.3,
            num_inference_steps=round(6 / 0.3),
            aesthetic_score=6.0,
            negative_aesthetic_score=2.5,
            output_type="np",
        ).images
    else:
        latents = base(
            **common,
            prompt=PROMPT,
            width=256,
            height=256,
            num_inference_steps=12,
            num_images_per_prompt=len(seeds),
            denoising_end=0.8,
            output_type="latent",
        ).images
        images = refiner(
            **common, **batch, image=latents, num_inference_steps=12, denoising_start=0.8, output_type="np"
        ).images
    return (np.asarray(images) * 255).round()


@pytest.mark.parametrize(("mode", "n"), [("sequential", 1), ("sequential", 2), ("handoff", 1), ("handoff", 2)])
async def test_images_match_hand_driven_diffusers(
    service: ImageService, tiny_pair: tuple[Path, Path], mode: str, n: int
) -> None:
    request = GenerationRequest(
        prompt=PROMPT, width=256, height=256, num_inference_steps=12, refiner_steps=6, mode=mode, seed=1234, n=n
    )
    result = await service.generate(request)
    ours = np.stack([np.asarray(image, dtype=np.float64) for image in result.images])
    expected = _reference(*tiny_pair, mode, result.seeds)
    assert result.refined
    assert ours.shape == expected.shape
    assert ours.std() > 1.0, "the tiny pair should not render a flat image"
    # fp32 tolerance: the two paths differ only in the order of float operations.
    assert np.abs(ours - expected).max() <= 1.0
