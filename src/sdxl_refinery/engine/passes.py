"""What the two-stage run works on and hands back: a pass of requests sharing one batch, and each
request's output.

A pass holds one or more requests of one batch key (everything but their words and seeds is equal), each
with its own seeds, progress and token; its tensors hold their images one after another, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..batching import RunItem
from ..errors import RefineryError
from ..request import GenerationRequest
from ..steps import StagePlan
from .image_prep import EditInputs, prepare
from .tracking import BatchTracker, StepTracker


@dataclass
class EngineOutput:
    images: list[Image.Image]
    base_steps: int
    refiner_steps: int
    refined: bool
    refinement_error: str | None
    timings: dict[str, float] = field(default_factory=dict)
    memory_plan: str = "resident"
    recoveries: list[str] = field(default_factory=list)
    decode_tiled: bool = False  # tiled for this run only, because a whole decode did not fit
    interrupted: bool = False  # stopped early by CancelToken.interrupt: the latents as they stood


# What one request of a run comes to: its output, or why it has none (cancelled, or failed on its own).
Outcome = EngineOutput | RefineryError


@dataclass
class Pass:
    """Requests sharing one pass through both stages: what every attempt (fp32 retry, lighter memory plan)
    needs again. Every field but the words and seeds is equal across `items` (their batch key), so the first
    request speaks for all of them in everything else."""

    items: list[RunItem]
    plan: StagePlan
    recoveries: list[str] = field(default_factory=list)
    edit: EditInputs | None = None  # the prepared pixels of an img2img or inpainting request (run alone)

    @property
    def request(self) -> GenerationRequest:
        return self.items[0].request

    @property
    def solo(self) -> bool:
        return len(self.items) == 1

    @property
    def counts(self) -> list[int]:
        return [len(item.seeds) for item in self.items]

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per image, seeded with its seed: the noise an image gets alone."""
        return [torch.Generator("cpu").manual_seed(seed) for item in self.items for seed in item.seeds]

    def tracker(self) -> BatchTracker:
        trackers = [StepTracker(self.plan.totals, item.on_progress, item.cancel, item.preview_every)
                    for item in self.items]  # fmt: skip
        return BatchTracker(trackers, self.counts)


def solo_pass(item: RunItem, plan: StagePlan) -> Pass:
    """A pass of one request, with its input images read (img2img and inpainting run alone)."""
    return Pass([item], plan, edit=prepare(item.request) if item.request.init_image is not None else None)
