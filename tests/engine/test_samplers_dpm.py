"""Every sampler x schedule type offered equals diffusers driven by hand (part 2: the DPM-Solvers and the others)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_refinery import ImageService
from sdxl_refinery.samplers import Sampler, ScheduleType

from .hand_driven import COMBINATIONS, SOLVERS, HandDriven, check_combination, sampler_request

# The combinations are split over two files so that the test workers share them (--dist loadfile).
MINE = [(sampler, schedule) for sampler, schedule in COMBINATIONS if sampler in SOLVERS]


@pytest.fixture(scope="module")
def hand(tiny_pair: tuple[Path, Path]) -> HandDriven:
    return HandDriven(*tiny_pair)


@pytest.mark.parametrize(("sampler", "schedule"), MINE, ids=[f"{a.value}-{b.value}" for a, b in MINE])
async def test_every_combination_equals_hand_driven_diffusers(
    service: ImageService, hand: HandDriven, sampler: Sampler, schedule: ScheduleType
) -> None:
    # Sequential with a batch of two, handoff alone: both modes, n=1 and n=2, for every combination.
    for mode, n in (("sequential", 2), ("handoff", 1)):
        request = sampler_request(sampler, schedule, mode, n)
        result = await service.generate(request)
        check_combination(result.images, result.seeds, request, hand)
        assert result.refined
        if mode == "sequential":  # the refiner executes exactly refiner_steps, for every sampler
            assert (result.base_steps, result.refiner_steps) == (6, 3)
