"""Samplers and schedule types, named as A1111 names them: the public vocabulary.

This module knows names only (no diffusers): which samplers exist, their
aliases, which schedule types each supports, and what A1111's "Automatic"
schedule means for each. The engine maps every name to the diffusers scheduler
and configuration that reproduces it (engine/schedulers.py).

Names match case-insensitively; A1111's older combined names are split
("DPM++ 2M Karras" is sampler "DPM++ 2M" with schedule "Karras").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any


class ScheduleType(str, Enum):
    """A schedule type: how the noise levels of a run are spaced (A1111's "Schedule type")."""

    AUTOMATIC = "Automatic"  # the sampler's own default, as A1111 chooses it (see Sampler.automatic)
    UNIFORM = "Uniform"
    NORMAL = "Normal"  # for SDXL's discrete schedule the same noise levels as Uniform (both linspace in t)
    SGM_UNIFORM = "SGM Uniform"
    KARRAS = "Karras"
    EXPONENTIAL = "Exponential"
    BETA = "Beta"

    @property
    def key(self) -> str:
        """A1111's machine name (`sgm_uniform`), as `/sdapi/v1/schedulers` lists it."""
        return self.value.lower().replace(" ", "_")

    @classmethod
    def _missing_(cls, value: object) -> ScheduleType | None:
        text = str(value).strip().lower().replace("_", " ")
        for member in cls:
            if text in (member.value.lower(), member.key.replace("_", " ")):
                return member
        if text == "sgmuniform":
            return cls.SGM_UNIFORM
        return None


SPACED = (ScheduleType.UNIFORM, ScheduleType.NORMAL, ScheduleType.SGM_UNIFORM)  # schedules that pick timesteps
SIGMAS = (ScheduleType.KARRAS, ScheduleType.EXPONENTIAL, ScheduleType.BETA)  # schedules that pick noise levels


@dataclass(frozen=True)
class SamplerInfo:
    """What the vocabulary says about one sampler.

    Attributes:
        aliases: A1111's other names for it (`k_euler`).
        schedules: the schedule types it supports besides Automatic.
        automatic: what Automatic means for it (A1111's per-sampler default; None: the model's own schedule).
        stochastic: it draws fresh noise every step (from each image's own generator).
        evaluations: model evaluations per step (2 for Heun-like samplers; the docs count steps as A1111 does).
    """

    aliases: tuple[str, ...]
    schedules: tuple[ScheduleType, ...]
    automatic: ScheduleType | None = None
    stochastic: bool = False
    evaluations: int = 1


class Sampler(str, Enum):
    """A sampler, by its A1111 name."""

    EULER = "Euler"
    EULER_A = "Euler a"
    HEUN = "Heun"
    DPM2 = "DPM2"
    DPM2_A = "DPM2 a"
    LMS = "LMS"
    DPMPP_2M = "DPM++ 2M"
    DPMPP_2M_SDE = "DPM++ 2M SDE"
    DPMPP_3M_SDE = "DPM++ 3M SDE"
    DPMPP_SDE = "DPM++ SDE"
    DDIM = "DDIM"
    PLMS = "PLMS"
    UNIPC = "UniPC"
    DEIS = "DEIS"

    @property
    def info(self) -> SamplerInfo:
        return SAMPLER_INFO[self]

    @classmethod
    def _missing_(cls, value: object) -> Sampler | None:
        text = str(value).strip().lower()
        for member in cls:
            if text == member.value.lower() or text in member.info.aliases:
                return member
        return None


_ALL = (*SPACED, *SIGMAS)
SAMPLER_INFO: dict[Sampler, SamplerInfo] = {
    Sampler.EULER: SamplerInfo(("k_euler",), _ALL),
    Sampler.EULER_A: SamplerInfo(("k_euler_a", "k_euler_ancestral"), SPACED, stochastic=True),
    Sampler.HEUN: SamplerInfo(("k_heun",), _ALL, evaluations=2),
    Sampler.DPM2: SamplerInfo(("k_dpm_2",), _ALL, evaluations=2),
    Sampler.DPM2_A: SamplerInfo(("k_dpm_2_a",), _ALL, stochastic=True, evaluations=2),
    Sampler.LMS: SamplerInfo(("k_lms",), _ALL),
    Sampler.DPMPP_2M: SamplerInfo(("k_dpmpp_2m",), _ALL, automatic=ScheduleType.KARRAS),
    Sampler.DPMPP_2M_SDE: SamplerInfo(("k_dpmpp_2m_sde",), _ALL, automatic=ScheduleType.EXPONENTIAL, stochastic=True),
    Sampler.DPMPP_3M_SDE: SamplerInfo(("k_dpmpp_3m_sde",), _ALL, automatic=ScheduleType.EXPONENTIAL, stochastic=True),
    Sampler.DPMPP_SDE: SamplerInfo(("k_dpmpp_sde",), SIGMAS, automatic=ScheduleType.KARRAS, stochastic=True),
    Sampler.DDIM: SamplerInfo(("ddim",), SPACED),
    Sampler.PLMS: SamplerInfo(("plms",), SPACED),
    Sampler.UNIPC: SamplerInfo(("unipc",), _ALL),
    Sampler.DEIS: SamplerInfo(("deis",), _ALL),
}


def resolve_schedule(sampler: Sampler, schedule: ScheduleType) -> ScheduleType | None:
    """The schedule a run really uses: Automatic becomes the sampler's A1111 default (None: the model's own)."""
    return sampler.info.automatic if schedule is ScheduleType.AUTOMATIC else schedule


def check_pair(sampler: Sampler, schedule: ScheduleType) -> str | None:
    """Why `sampler` cannot run `schedule`, or None when it can."""
    if schedule is ScheduleType.AUTOMATIC or schedule in sampler.info.schedules:
        return None
    offered = ", ".join(s.value for s in (ScheduleType.AUTOMATIC, *sampler.info.schedules))
    return f"{schedule.value!r} is not a schedule {sampler.value} supports; it supports {offered}"


def split_combined(name: str) -> tuple[Sampler, ScheduleType] | None:
    """A1111's older combined names: "DPM++ 2M Karras" is (DPM++ 2M, Karras); None if `name` is not one."""
    text = name.strip()
    for schedule in (ScheduleType.KARRAS, ScheduleType.EXPONENTIAL):
        suffix = " " + schedule.value.lower()
        if text.lower().endswith(suffix):
            try:
                return Sampler(text[: -len(suffix)]), schedule
            except ValueError:
                return None
    return None


def a1111_samplers() -> list[dict[str, Any]]:
    """`/sdapi/v1/samplers` as A1111 answers it: name, aliases, options (its Automatic schedule)."""
    rows = []
    for sampler in Sampler:
        automatic = sampler.info.automatic
        options = {"scheduler": automatic.key} if automatic else {}
        if sampler.info.evaluations == 2:
            options["second_order"] = "True"
        rows.append({"name": sampler.value, "aliases": list(sampler.info.aliases), "options": options})
    return rows


def a1111_schedulers() -> list[dict[str, Any]]:
    """`/sdapi/v1/schedulers` as A1111 answers it: name, label, aliases, default_rho, need_inner_model."""
    return [{"name": s.key, "label": s.value, "aliases": ["SGMUniform"] if s is ScheduleType.SGM_UNIFORM else None,
             "default_rho": 7.0 if s is ScheduleType.KARRAS else -1, "need_inner_model": s in SPACED}
            for s in ScheduleType]  # fmt: skip
