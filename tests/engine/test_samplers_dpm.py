"""Every sampler x schedule type offered equals diffusers driven by hand (part 2: the DPM-Solvers and the others)."""

from __future__ import annotations

import pytest

from sdxl_refinery import ImageService
from sdxl_refinery.samplers import Sampler, ScheduleType

from .hand_driven import COMBINATIONS, SOLVERS, HandDriven, check_both_modes

# The combinations are split over two files so that the test workers share them (--dist loadfile).
MINE = [(sampler, schedule) for sampler, schedule in COMBINATIONS if sampler in SOLVERS]


@pytest.mark.parametrize(("sampler", "schedule"), MINE, ids=[f"{a.value}-{b.value}" for a, b in MINE])
async def test_every_combination_equals_hand_driven_diffusers(
    service: ImageService, hand: HandDriven, sampler: Sampler, schedule: ScheduleType
) -> None:
    await check_both_modes(service, hand, sampler, schedule)
