"""Per-step bookkeeping shared by both stages: progress, ETA, previews, cancellation.

Each request of a run has a `StepTracker`: it counts the steps each stage really
executes and reports that request's progress with an ETA over both stages. A
`BatchTracker` holds the trackers of every request sharing one pass and is what
diffusers gets as `callback_on_step_end`. After each step it lets a cancelled
request go (its images are discarded) and keeps an interrupted request's latents
as they stand; when no request is left it raises `Cancelled` (all were
cancelled) or stops the pipeline's loop (diffusers' own `_interrupt` flag).
A run of one request therefore stops within one step, as it always did.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..errors import Cancelled
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
    def cancelled(self) -> bool:
        """Whether the request was cancelled: its images are to be discarded."""
        return self._cancel is not None and self._cancel.cancelled

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

    def evaluated(self, pipe: Any, latents: torch.Tensor | None) -> None:
        """After each model evaluation: count, and report when a step is done (as A1111 counts Heun's or
        PLMS's steps: when its last evaluation is done). `latents` are this request's own."""
        self._evaluations += 1
        planned = self.planned[self._stage] - self._pass_offset if self._pass_planned is None else self._pass_planned
        evaluations = getattr(pipe, "num_timesteps", None) or planned
        done = self._pass_offset + min(self._evaluations * planned // evaluations, planned)
        if done == self.executed[self._stage]:  # an evaluation inside a step
            return
        self.executed[self._stage] = done
        now = time.perf_counter()
        if self._on_progress is not None:
            done = self.executed[self._stage]
            preview = None
            if self._preview_every and latents is not None and done % self._preview_every == 0:
                preview = latents_to_preview(latents)
            self._on_progress(
                Progress(self._stage, done, self.planned[self._stage], now - self._started, self._eta(now), preview)
            )


class BatchTracker:
    """The trackers of the requests sharing one pass, behind the one callback diffusers calls.

    Args:
        trackers: one per request, in batch order.
        counts: images per request, in batch order (request i owns the next `counts[i]` latents).
    """

    def __init__(self, trackers: list[StepTracker], counts: list[int]) -> None:
        self.trackers = trackers
        starts = [sum(counts[:index]) for index in range(len(counts))]
        self.slices = [slice(start, start + count) for start, count in zip(starts, counts, strict=True)]
        self.kept: dict[int, torch.Tensor] = {}  # request index -> its latents when it was interrupted
        self.gone: set[int] = set()  # requests that need no more steps: cancelled or interrupted

    @property
    def live(self) -> list[int]:
        """The requests still denoising."""
        return [index for index in range(len(self.trackers)) if index not in self.gone]

    @property
    def interrupted(self) -> bool:
        """Whether no request needs more steps (the rest of the run is skipped, its images kept as they stand)."""
        return not self.live

    def cancelled(self, index: int) -> bool:
        return self.trackers[index].cancelled

    def begin_stage(self, stage: int, planned: int | None = None) -> None:
        """Start `stage` for every request still denoising.

        Raises:
            Cancelled: every request was cancelled.
        """
        self.settle(None)
        for index in self.live:
            self.trackers[index].begin_stage(stage, planned)

    def begin_pass(self, planned: int) -> None:
        """Start another pipeline call of the current stage (hires fix's second pass) of `planned` steps.

        Raises:
            Cancelled: every request was cancelled.
        """
        self.settle(None)
        for index in self.live:
            self.trackers[index].begin_pass(planned)

    def check_cancelled(self) -> None:
        """Raises: Cancelled: every request was cancelled (one cancelled request does not stop the others)."""
        if all(tracker.cancelled for tracker in self.trackers):
            raise Cancelled("cancelled by request")

    def __call__(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        """diffusers' `callback_on_step_end` hook: each request counts and reports its step; then cancelled
        and interrupted requests are let go, and the pipeline stops when none is left."""
        latents = tensors.get("latents")
        latents = latents if isinstance(latents, torch.Tensor) else None
        for index in self.live:
            own = latents[self.slices[index]] if latents is not None else None
            self.trackers[index].evaluated(pipe, own)
        self.settle(latents)
        if not self.live:
            pipe._interrupt = True  # the pipeline skips its remaining steps and returns the latents
        return {}

    def settle(self, latents: torch.Tensor | None) -> None:
        """Stop tracking cancelled requests, and interrupted ones when `latents` (the whole batch's, as they
        stand) are given to keep their share of.

        Raises:
            Cancelled: every request was cancelled.
        """
        for index in self.live:
            tracker = self.trackers[index]
            if tracker.cancelled:
                self.gone.add(index)
            elif tracker.interrupted and latents is not None:
                self.kept[index] = latents[self.slices[index]].detach().clone()
                self.gone.add(index)
        self.check_cancelled()
