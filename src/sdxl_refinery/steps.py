"""The step plan: how many steps each stage executes, decided by one pure function.

Validation (a handoff point that leaves a stage no step), the engine (what it
hands diffusers), the worker (progress totals, ETA, SSE events) and the CLI's
progress bars all call `plan_steps`, so the numbers a client sees are the
numbers that run. The maths follows diffusers' schedulers: the timestep
spacings of `set_timesteps` and the SDXL pipelines' `denoising_end` cutoff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from .request import GenerationRequest


@dataclass(frozen=True)
class Schedule:
    """The parts of a scheduler's configuration that decide its timesteps.

    Attributes:
        num_train_timesteps: length of the training schedule (1000 for SDXL).
        timestep_spacing: `leading`, `trailing` or `linspace`, as in diffusers.
        steps_offset: added to `leading` timesteps (1 for SDXL).
    """

    num_train_timesteps: int = 1000
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    @classmethod
    def from_config(cls, config: Any) -> Schedule:
        """The schedule of a diffusers scheduler config (a mapping or an object with attributes)."""
        get = config.get if hasattr(config, "get") else lambda key, default: getattr(config, key, default)
        return cls(
            int(get("num_train_timesteps", 1000)), str(get("timestep_spacing", "leading")), int(get("steps_offset", 0))
        )

    def timesteps(self, steps: int) -> list[float]:
        """The timesteps of a `steps`-step run, highest first, as diffusers' `set_timesteps` makes them.

        Raises:
            ValueError: an unknown spacing.
        """
        total = self.num_train_timesteps
        if self.timestep_spacing == "leading":
            ratio = total // steps
            return [float(round(i * ratio) + self.steps_offset) for i in reversed(range(steps))]
        if self.timestep_spacing == "trailing":  # numpy's own arange and rounding, as diffusers computes it
            return [float(t) - 1 for t in np.arange(total, 0, -total / steps).round()]
        if self.timestep_spacing == "linspace":
            return [float(t) for t in np.linspace(0, total - 1, steps, dtype=np.float32)[::-1]]
        raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not one of leading, trailing, linspace")


class Timesteps(Protocol):
    """Anything that lists a run's timesteps: `Schedule` here, the engine's real scheduler at run time."""

    @property
    def num_train_timesteps(self) -> int: ...

    def timesteps(self, steps: int) -> list[float]: ...


SDXL_SCHEDULE = Schedule()  # SDXL base and refiner 1.0 (EulerDiscreteScheduler, leading spacing, offset 1)


@dataclass(frozen=True)
class StagePlan:
    """What each stage will execute.

    Attributes:
        base_steps: denoising steps the base executes.
        refiner_steps: denoising steps the refiner executes (0 without refinement).
        refiner_schedule: `num_inference_steps` handed to the refiner pipeline.
        refiner_strength: img2img strength handed to the refiner (sequential mode only).
        first_pass_steps: of `base_steps`, those of hires fix's first pass (0 without hires fix).
        base_schedule: the schedule length of the base pass that hands over to the refiner (its
            `num_inference_steps`; the hires pass's own under hires fix).
    """

    base_steps: int
    refiner_steps: int
    refiner_schedule: int
    refiner_strength: float | None
    first_pass_steps: int = 0
    base_schedule: int = 0

    @property
    def second_pass_steps(self) -> int:
        """Base steps of the pass after hires fix's upscale (or of the only pass)."""
        return self.base_steps - self.first_pass_steps

    @property
    def totals(self) -> dict[int, int]:
        """Steps per stage, keyed 1 (base) and 2 (refiner), as progress reports number them."""
        return {1: self.base_steps, 2: self.refiner_steps}

    @property
    def total(self) -> int:
        return self.base_steps + self.refiner_steps


def handoff_base_steps(steps: int, switch_at: float, schedule: Timesteps = SDXL_SCHEDULE) -> int:
    """Base steps before `switch_at`: the timesteps at or above diffusers' `denoising_end` cutoff."""
    total = schedule.num_train_timesteps
    cutoff = round(total - switch_at * total)  # the same float expression as diffusers
    return sum(1 for timestep in schedule.timesteps(steps) if timestep >= cutoff)


def sequential_refiner_schedule(refiner_steps: int, strength: float) -> tuple[int, float]:
    """The refiner's schedule length and an img2img strength that executes exactly `refiner_steps`.

    diffusers runs `int(schedule * strength)` steps; floating point can make that
    one short (29.999...), so the strength is nudged up to the smallest value
    that yields the requested count. It moves by less than 1e-12.
    """
    schedule = max(round(refiner_steps / strength), refiner_steps)
    effective = refiner_steps / schedule
    while int(schedule * effective) < refiner_steps:
        effective = math.nextafter(effective, 2.0)
    return schedule, min(effective, 1.0)


def img2img_steps(steps: int, strength: float) -> int:
    """Steps an img2img pass of `steps` at `strength` executes: diffusers' `int(steps * strength)`, as A1111
    runs by default (its "do exactly the amount of steps the slider specifies" option off)."""
    return min(int(steps * strength), steps)


def plan_steps(request: GenerationRequest, schedule: Timesteps = SDXL_SCHEDULE) -> StagePlan:
    """How many steps the base and the refiner execute for `request` under `schedule`.

    In handoff mode a stage may be left with no step; callers that must refuse
    that (validation) check `base_steps` and `refiner_steps`. Validation uses the model's
    own schedule (`SDXL_SCHEDULE`); the engine passes the run's real scheduler, whose
    timesteps differ for other schedule types (Karras, ...), and checks again before work.
    """
    from .request import Mode

    # 1. The base passes: hires fix's first pass (whole), then the pass that hands over, redrawing `strength`
    #    of its schedule when it starts from an image (an init image or hires fix's upscale).
    first = request.num_inference_steps if request.enable_hr else 0
    steps = (request.hr_second_pass_steps or request.num_inference_steps) if request.enable_hr else (
        request.num_inference_steps)  # fmt: skip
    from_image = request.init_image is not None or request.enable_hr
    executed = img2img_steps(steps, request.strength) if from_image else steps
    if not request.use_refinement:
        return StagePlan(first + executed, 0, 0, None, first, steps)
    # 2. The refiner: a fixed count (sequential), or the rest of the schedule after the switch (handoff).
    if request.mode is Mode.SEQUENTIAL:
        refiner_schedule, strength = sequential_refiner_schedule(request.refiner_steps, request.refiner_strength)
        return StagePlan(first + executed, request.refiner_steps, refiner_schedule, strength, first, steps)
    total = schedule.num_train_timesteps
    cutoff = round(total - request.switch_at * total)
    base_steps = sum(1 for timestep in schedule.timesteps(steps)[steps - executed :] if timestep >= cutoff)
    refiner_steps = steps - handoff_base_steps(steps, request.switch_at, schedule)
    return StagePlan(first + base_steps, refiner_steps, steps, None, first, steps)


def require_both_stages(request: GenerationRequest, plan: StagePlan) -> None:
    """Refuse a refined handoff whose switch point leaves the base or the refiner no step.

    Raises:
        InvalidRequest: naming `switch_at`.
    """
    from .errors import InvalidRequest

    if plan.second_pass_steps == 0 and (request.init_image is not None or request.enable_hr):
        steps = plan.base_schedule
        if img2img_steps(steps, request.strength) == 0:
            raise InvalidRequest("strength", f"{request.strength} of {steps} steps runs no step; it must be at "
                                             f"least {1 / steps:g}")  # fmt: skip
    if request.use_refinement and 0 in (plan.second_pass_steps, plan.refiner_steps):
        stage = "base" if plan.second_pass_steps == 0 else "refiner"
        raise InvalidRequest(
            "switch_at",
            f"{request.switch_at} leaves the {stage} no step out of num_inference_steps={request.num_inference_steps}",
        )
