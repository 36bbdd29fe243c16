"""Per-step bookkeeping shared by both stages: progress, ETA, previews, cancellation.

A `StepTracker` is handed to diffusers as `callback_on_step_end`. It counts the
steps each stage really executes, raises `Cancelled` at the first step after a
cancellation, stops the pipeline's loop at the first step after an interrupt
(diffusers' own `_interrupt` flag: the stage returns its latents as they stand),
and reports progress with an ETA over both stages.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..request import CancelToken, Progress, ProgressCallback
from .preview import latents_to_preview


class StepTracker:
    """Counts and reports steps of a two-stage run.

    Args:
        planned: steps each stage will execute, keyed by stage (1 base, 2 refiner).
        on_progress: called after every step; may be None.
        cancel: checked after every step; may be None.
        preview_every: attach a preview every this many steps (0: never).
    """

    def __init__(
        self,
        planned: dict[int, int],
        on_progress: ProgressCallback | None,
        cancel: CancelToken | None,
        preview_every: int = 0,
    ) -> None:
        self.planned = dict(planned)
        self.executed = {stage: 0 for stage in planned}
        self._on_progress = on_progress
        self._cancel = cancel
        self._preview_every = preview_every
        self._started = time.perf_counter()
        self._stage = 1
        self._stage_started = self._started
        self._evaluations = 0  # model evaluations in this pass (two per step for second-order samplers)
        self._pass_offset = 0  # steps of this stage's earlier passes (hires fix's first pass)
        self._pass_planned: int | None = None  # steps planned for this pass; None: the stage's whole plan

    def begin_stage(self, stage: int, planned: int | None = None) -> None:
        """Mark the start of `stage`, optionally re-planning its step count."""
        self.check_cancelled()
        self._stage = stage
        if planned is not None:
            self.planned[stage] = planned
        self.executed[stage] = 0
        self._evaluations = 0
        self._pass_offset, self._pass_planned = 0, None
        self._stage_started = time.perf_counter()

    def begin_pass(self, planned: int) -> None:
        """Start another pipeline call within the current stage (hires fix's two base passes), of `planned` steps."""
        self.check_cancelled()
        self._pass_offset = self.executed[self._stage]
        self._pass_planned = planned
        self._evaluations = 0

    def check_cancelled(self) -> None:
        """Raises: Cancelled: the run's token was cancelled."""
        if self._cancel is not None:
            self._cancel.raise_if_cancelled()

    @property
    def interrupted(self) -> bool:
        """Whether the run was asked to stop and keep what it has."""
        return self._cancel is not None and self._cancel.interrupted

    def _eta(self, now: float) -> float:
        done = self.executed[self._stage]
        per_step = (now - self._stage_started) / max(done, 1)
        remaining = self.planned[self._stage] - done
        remaining += sum(n for stage, n in self.planned.items() if stage > self._stage)
        return max(remaining, 0) * per_step

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' `callback_on_step_end` hook, after each model evaluation: count, report, maybe cancel or
        interrupt. A step counts when its last evaluation is done, as A1111 counts Heun's or PLMS's steps."""
        self._evaluations += 1
        planned = self.planned[self._stage] - self._pass_offset if self._pass_planned is None else self._pass_planned
        evaluations = getattr(pipe, "num_timesteps", None) or planned
        done = self._pass_offset + min(self._evaluations * planned // evaluations, planned)
        if done == self.executed[self._stage]:  # an evaluation inside a step
            return self._checked(pipe)
        self.executed[self._stage] = done
        now = time.perf_counter()
        if self._on_progress is not None:
            done = self.executed[self._stage]
            preview = None
            latents = tensors.get("latents")
            if self._preview_every and isinstance(latents, torch.Tensor) and done % self._preview_every == 0:
                preview = latents_to_preview(latents)
            self._on_progress(
                Progress(self._stage, done, self.planned[self._stage], now - self._started, self._eta(now), preview)
            )
        return self._checked(pipe)

    def _checked(self, pipe: Any) -> dict[str, Any]:
        self.check_cancelled()
        if self.interrupted:
            pipe._interrupt = True  # the pipeline skips its remaining steps and returns the latents
        return {}
