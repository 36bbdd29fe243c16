"""diffusers driven by hand with a chosen scheduler, for the sampler equivalence tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine.schedulers import scheduler_config
from sdxl_refinery.samplers import Sampler, ScheduleType

PROMPT = "a lighthouse on a cliff at dusk"
COMBINATIONS = [(sampler, schedule) for sampler in Sampler for schedule in (ScheduleType.AUTOMATIC,
                                                                            *sampler.info.schedules)]  # fmt: skip
SIZE = {"width": 64, "height": 64}
# The second test file's share: the DPM-Solvers and the non-k-diffusion samplers.
SOLVERS = {Sampler.DPMPP_2M, Sampler.DPMPP_2M_SDE, Sampler.DPMPP_3M_SDE, Sampler.DPMPP_SDE, Sampler.DDIM,
           Sampler.PLMS, Sampler.UNIPC, Sampler.DEIS}  # fmt: skip


class HandDriven:
    """diffusers' pipelines loaded once; each call sets fresh schedulers as a user would."""

    def __init__(self, base_dir: Path, refiner_dir: Path) -> None:
        self.base = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=torch.float32)
        self.refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            refiner_dir, text_encoder_2=self.base.text_encoder_2, vae=self.base.vae, torch_dtype=torch.float32
        )
        self.configs = self.base.scheduler.config, self.refiner.scheduler.config
        for pipe in (self.base, self.refiner):
            pipe.set_progress_bar_config(disable=True)

    def render(
        self, request: GenerationRequest, seeds: list[int], prompt: str = PROMPT, negative_prompt: str | None = None
    ) -> np.ndarray:
        for pipe, config, (sampler, schedule) in (
            (self.base, self.configs[0], (request.sampler, request.scheduler)),
            (self.refiner, self.configs[1], request.refiner_sampling),
        ):
            kind, settings = scheduler_config(sampler, schedule)
            pipe.scheduler = kind.from_config(config, **settings)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        common: dict[str, Any] = {"guidance_scale": request.guidance_scale, "generator": generators}
        handoff = request.mode.value == "handoff"
        latents = self.base(
            **common, prompt=prompt, negative_prompt=negative_prompt, num_images_per_prompt=len(seeds),
            num_inference_steps=request.num_inference_steps,
            denoising_end=request.switch_at if handoff else None, output_type="latent", **SIZE,
        ).images  # fmt: skip
        if handoff:
            steps: dict[str, Any] = {"num_inference_steps": request.num_inference_steps,
                                     "denoising_start": request.switch_at}  # fmt: skip
        else:
            steps = {"num_inference_steps": round(request.refiner_steps / 0.3), "strength": 0.3}
        negatives = None if negative_prompt is None else [negative_prompt] * len(seeds)
        images = self.refiner(**common, prompt=[prompt] * len(seeds), negative_prompt=negatives, image=latents,
                              output_type="np", **steps).images  # fmt: skip
        return (np.asarray(images) * 255).round()


def sampler_request(sampler: Sampler, schedule: ScheduleType, mode: str, n: int) -> GenerationRequest:
    steps = {"num_inference_steps": 6, "refiner_steps": 3} if mode == "sequential" else {"num_inference_steps": 10}
    return GenerationRequest(prompt=PROMPT, sampler=sampler, scheduler=schedule, mode=mode, switch_at=0.7,
                             seed=42, n=n, **steps, **SIZE)  # fmt: skip


async def check_both_modes(service: ImageService, hand: HandDriven, sampler: Sampler, schedule: ScheduleType) -> None:
    """Sequential with a batch of two, handoff alone: both modes, n=1 and n=2, for one combination. Our images
    equal the hand-driven ones within 2/255 (float order only), and the refiner runs exactly refiner_steps."""
    for mode, n in (("sequential", 2), ("handoff", 1)):
        request = sampler_request(sampler, schedule, mode, n)
        result = await service.generate(request)
        ours = np.stack([np.asarray(image, dtype=np.float64) for image in result.images])
        expected = hand.render(request, result.seeds)
        assert ours.shape == expected.shape == (n, 64, 64, 3)
        assert np.abs(ours - expected).max() <= 2.0, (mode, n)
        assert result.refined
        if mode == "sequential":
            assert (result.base_steps, result.refiner_steps) == (6, 3)
