"""Each A1111 sampler and schedule type as the diffusers scheduler and configuration that reproduce it.

The mapping follows diffusers' own table (docs: "Schedulers", the A1111/k-diffusion
column): "DPM++ 2M" is DPMSolverMultistepScheduler, its Karras schedule is
`use_karras_sigmas=True`, "SGM Uniform" is `timestep_spacing="trailing"`, and so on.
Every run gets fresh scheduler objects built from the model's own scheduler
configuration, so no scheduler (which keeps a step index) is ever shared by two
runs, and nothing is reloaded.

Final steps follow diffusers' advice for SDXL at low step counts: the multistep
DPM-Solvers keep `lower_order_final=True` and `final_sigmas_type="zero"` (their
defaults), which is also what k-diffusion's DPM++ 2M does on its last step.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import InvalidRequest
from ..samplers import Sampler, ScheduleType, resolve_schedule

DIFFUSERS_SAMPLERS: dict[Sampler, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    Sampler.EULER: (EulerDiscreteScheduler, {}),
    Sampler.EULER_A: (EulerAncestralDiscreteScheduler, {}),
    Sampler.HEUN: (HeunDiscreteScheduler, {}),
    Sampler.DPM2: (KDPM2DiscreteScheduler, {}),
    Sampler.DPM2_A: (KDPM2AncestralDiscreteScheduler, {}),
    Sampler.LMS: (LMSDiscreteScheduler, {}),
    Sampler.DPMPP_2M: (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler.DPMPP_2M_SDE: (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler.DPMPP_3M_SDE: (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    # diffusers' table maps DPM++ SDE to the singlestep solver; its SDE variant draws noise from each image's
    # generator (DPMSolverSDEScheduler's Brownian tree would share one seed across a batch).
    Sampler.DPMPP_SDE: (DPMSolverSinglestepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    Sampler.DDIM: (DDIMScheduler, {}),
    Sampler.PLMS: (PNDMScheduler, {"skip_prk_steps": True}),  # PNDM without its Runge-Kutta warm-up is PLMS
    Sampler.UNIPC: (UniPCMultistepScheduler, {}),
    Sampler.DEIS: (DEISMultistepScheduler, {}),
}
SCHEDULE_CONFIG: dict[ScheduleType, dict[str, Any]] = {
    ScheduleType.UNIFORM: {"timestep_spacing": "linspace"},
    ScheduleType.NORMAL: {"timestep_spacing": "linspace"},
    ScheduleType.SGM_UNIFORM: {"timestep_spacing": "trailing"},
    ScheduleType.KARRAS: {"use_karras_sigmas": True},
    ScheduleType.EXPONENTIAL: {"use_exponential_sigmas": True},
    ScheduleType.BETA: {"use_beta_sigmas": True},
}


def scheduler_config(sampler: Sampler, schedule: ScheduleType) -> tuple[type[SchedulerMixin], dict[str, Any]]:
    """The diffusers scheduler class and the settings (over the model's config) for a sampler and schedule."""
    kind, settings = DIFFUSERS_SAMPLERS[sampler]
    resolved = resolve_schedule(sampler, schedule)
    return kind, {**settings, **(SCHEDULE_CONFIG[resolved] if resolved is not None else {})}


def make_scheduler(model_config: Any, sampler: Sampler, schedule: ScheduleType) -> SchedulerMixin:
    """A fresh scheduler for one run: `sampler` with `schedule`, over the model's own scheduler config.

    Raises:
        InvalidRequest: the model is read as v-prediction or zero terminal SNR and diffusers' scheduler for
            this sampler cannot be told so (it would draw a wrong image).
    """
    kind, settings = scheduler_config(sampler, schedule)
    scheduler: SchedulerMixin = kind.from_config(model_config, **settings)
    understood = inspect.signature(kind.__init__).parameters  # from_config keeps keys a scheduler ignores
    for key, plain in (("prediction_type", "epsilon"), ("rescale_betas_zero_snr", False)):
        wanted = model_config.get(key, plain)
        if wanted != plain and key not in understood:
            raise InvalidRequest("sampler", f"{sampler.value} cannot sample this model ({key}={wanted}) in "
                                            f"diffusers; Euler, Euler a, DPM++ 2M, DDIM and UniPC can")  # fmt: skip
    return scheduler


def sampler_timesteps(scheduler: SchedulerMixin, steps: int) -> list[float]:
    """The timestep each sampler step starts at, highest first, as `scheduler` makes them for `steps` steps.

    Second-order schedulers list a timestep per model evaluation (Heun twice per step); a
    step is counted once, as A1111 counts it. Works on a copy: `scheduler` is left as it was.
    """
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps, device="cpu")
    timesteps = [float(t) for t in probe.timesteps]
    if getattr(probe, "order", 1) == 2:
        timesteps = timesteps[::2]
    steps_only: list[float] = []
    for timestep in timesteps:  # PLMS repeats one timestep for its warm-up evaluation
        if not steps_only or timestep != steps_only[-1]:
            steps_only.append(timestep)
    return steps_only


@dataclass(frozen=True)
class RunSchedule:
    """A run's real scheduler as the step plan reads it (`steps.Timesteps`)."""

    scheduler: SchedulerMixin

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def timesteps(self, steps: int) -> list[float]:
        return sampler_timesteps(self.scheduler, steps)
