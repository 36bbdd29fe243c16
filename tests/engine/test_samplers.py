"""Every sampler x schedule type offered equals diffusers driven by hand with that scheduler (part 1: k-diffusion
family). The reference (hand_driven.py) is what a diffusers user writes: `pipe.scheduler` set to the scheduler
class over the model's own config, then base and refiner."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_refinery import ImageService
from sdxl_refinery.engine.schedulers import scheduler_config
from sdxl_refinery.samplers import Sampler, ScheduleType

from .hand_driven import COMBINATIONS, SOLVERS, HandDriven, check_both_modes, sampler_request

# The combinations are split over two files so that the test workers share them (--dist loadfile).
MINE = [(sampler, schedule) for sampler, schedule in COMBINATIONS if sampler not in SOLVERS]


@pytest.mark.parametrize(("sampler", "schedule"), MINE, ids=[f"{a.value}-{b.value}" for a, b in MINE])
async def test_every_combination_equals_hand_driven_diffusers(
    service: ImageService, hand: HandDriven, sampler: Sampler, schedule: ScheduleType
) -> None:
    await check_both_modes(service, hand, sampler, schedule)


@pytest.mark.parametrize("sampler", [s for s in Sampler if s.info.stochastic], ids=lambda s: s.value)
async def test_stochastic_samplers_draw_each_images_noise_from_its_own_seed(
    service: ImageService, sampler: Sampler
) -> None:
    batch = await service.generate(sampler_request(sampler, ScheduleType.AUTOMATIC, "sequential", 2))
    alone = await service.generate(sampler_request(sampler, ScheduleType.AUTOMATIC, "sequential", 1).model_copy(
        update={"seed": 43}))  # fmt: skip
    difference = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert difference.max() <= 1


@pytest.mark.parametrize("sampler", [Sampler.HEUN, Sampler.DPM2, Sampler.PLMS, Sampler.DPMPP_SDE])
async def test_steps_are_counted_as_a1111_counts_them(service: ImageService, sampler: Sampler) -> None:
    """Heun and DPM2 evaluate the model twice a step, PLMS once more at the start: still N steps reported."""
    seen: list[tuple[int, int]] = []
    request = sampler_request(sampler, ScheduleType.AUTOMATIC, "sequential", 1)
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
