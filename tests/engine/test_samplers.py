"""Every sampler x schedule type offered equals diffusers driven by hand with that scheduler.

The reference below is what a diffusers user writes: set `pipe.scheduler` to the
scheduler class over the model's own config, then run base and refiner. The
table of which diffusers scheduler reproduces which A1111 name is checked
separately against diffusers' documentation (test_the_mapping_is_diffusers_table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine.schedulers import scheduler_config
from sdxl_refinery.samplers import Sampler, ScheduleType

PROMPT = "a lighthouse on a cliff at dusk"
COMBINATIONS = [(sampler, schedule) for sampler in Sampler for schedule in (ScheduleType.AUTOMATIC,
                                                                            *sampler.info.schedules)]  # fmt: skip
SIZE = {"width": 64, "height": 64}


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

    def render(self, request: GenerationRequest, seeds: list[int]) -> np.ndarray:
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
            **common, prompt=PROMPT, num_images_per_prompt=len(seeds), num_inference_steps=request.num_inference_steps,
            denoising_end=request.switch_at if handoff else None, output_type="latent", **SIZE,
        ).images  # fmt: skip
        if handoff:
            steps: dict[str, Any] = {"num_inference_steps": request.num_inference_steps,
                                     "denoising_start": request.switch_at}  # fmt: skip
        else:
            steps = {"num_inference_steps": round(request.refiner_steps / 0.3), "strength": 0.3}
        images = self.refiner(**common, prompt=[PROMPT] * len(seeds), image=latents, output_type="np", **steps).images
        return (np.asarray(images) * 255).round()


@pytest.fixture(scope="module")
def hand(tiny_pair: tuple[Path, Path]) -> HandDriven:
    return HandDriven(*tiny_pair)


def _request(sampler: Sampler, schedule: ScheduleType, mode: str, n: int) -> GenerationRequest:
    steps = {"num_inference_steps": 6, "refiner_steps": 3} if mode == "sequential" else {"num_inference_steps": 10}
    return GenerationRequest(prompt=PROMPT, sampler=sampler, scheduler=schedule, mode=mode, switch_at=0.7,
                             seed=42, n=n, **steps, **SIZE)  # fmt: skip


@pytest.mark.parametrize(("sampler", "schedule"), COMBINATIONS, ids=[f"{a.value}-{b.value}" for a, b in COMBINATIONS])
async def test_every_combination_equals_hand_driven_diffusers(
    service: ImageService, hand: HandDriven, sampler: Sampler, schedule: ScheduleType
) -> None:
    # Sequential with a batch of two, handoff alone: both modes, n=1 and n=2, for every combination.
    for mode, n in (("sequential", 2), ("handoff", 1)):
        request = _request(sampler, schedule, mode, n)
        result = await service.generate(request)
        ours = np.stack([np.asarray(image, dtype=np.float64) for image in result.images])
        expected = hand.render(request, result.seeds)
        assert ours.shape == expected.shape == (n, 64, 64, 3)
        assert np.abs(ours - expected).max() <= 2.0, (mode, n)  # 2/255: float order only
        assert result.refined
        if mode == "sequential":  # the refiner executes exactly refiner_steps, for every sampler
            assert (result.base_steps, result.refiner_steps) == (6, 3)


@pytest.mark.parametrize("sampler", [s for s in Sampler if s.info.stochastic], ids=lambda s: s.value)
async def test_stochastic_samplers_draw_each_images_noise_from_its_own_seed(
    service: ImageService, sampler: Sampler
) -> None:
    batch = await service.generate(_request(sampler, ScheduleType.AUTOMATIC, "sequential", 2))
    alone = await service.generate(_request(sampler, ScheduleType.AUTOMATIC, "sequential", 1).model_copy(
        update={"seed": 43}))  # fmt: skip
    difference = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert difference.max() <= 1


@pytest.mark.parametrize("sampler", [Sampler.HEUN, Sampler.DPM2, Sampler.PLMS, Sampler.DPMPP_SDE])
async def test_steps_are_counted_as_a1111_counts_them(service: ImageService, sampler: Sampler) -> None:
    """Heun and DPM2 evaluate the model twice a step, PLMS once more at the start: still N steps reported."""
    seen: list[tuple[int, int]] = []
    request = _request(sampler, ScheduleType.AUTOMATIC, "sequential", 1)
    result = await service.generate(request, on_progress=lambda p: seen.append((p.stage, p.step)))
    assert [step for stage, step in seen if stage == 1] == list(range(1, 7))
    assert [step for stage, step in seen if stage == 2] == [1, 2, 3]  # the refiner executes exactly refiner_steps
    assert (result.base_steps, result.refiner_steps) == (6, 3)


def test_the_mapping_is_diffusers_table() -> None:
    """diffusers' docs (Schedulers overview, A1111/k-diffusion column), written out independently here."""
    table = {
        ("DPM++ 2M", "Automatic"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # A1111's default
        ("DPM++ 2M", "Karras"): ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("DPM++ 2M", "SGM Uniform"): ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
        ("DPM++ 2M SDE", "Karras"): (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver++"},
        ),
        ("DPM++ SDE", "Karras"): ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
        ("DPM2", "Karras"): ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
        ("DPM2 a", "Automatic"): ("KDPM2AncestralDiscreteScheduler", {}),
        ("Euler", "Automatic"): ("EulerDiscreteScheduler", {}),
        ("Euler a", "Automatic"): ("EulerAncestralDiscreteScheduler", {}),
        ("Heun", "Automatic"): ("HeunDiscreteScheduler", {}),
        ("LMS", "Karras"): ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
        ("UniPC", "Uniform"): ("UniPCMultistepScheduler", {"timestep_spacing": "linspace"}),
        ("DEIS", "Beta"): ("DEISMultistepScheduler", {"use_beta_sigmas": True}),
        ("DDIM", "Automatic"): ("DDIMScheduler", {}),
        ("PLMS", "Automatic"): ("PNDMScheduler", {"skip_prk_steps": True}),
    }
    for (sampler, schedule), (name, settings) in table.items():
        kind, made = scheduler_config(Sampler(sampler), ScheduleType(schedule))
        assert kind.__name__ == name, (sampler, schedule)
        assert made.items() >= settings.items(), (sampler, schedule)


def test_every_offered_schedule_is_a_setting_its_diffusers_scheduler_has() -> None:
    import inspect

    for sampler, schedule in COMBINATIONS:
        kind, settings = scheduler_config(sampler, schedule)
        accepted = inspect.signature(kind.__init__).parameters
        assert set(settings) <= set(accepted), (sampler.value, schedule.value, set(settings) - set(accepted))
