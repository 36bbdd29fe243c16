"""A fake engine for tests whose subject is the server or the queue, not diffusion.

It runs the request's real step plan (`plan_steps`), reports every step, honours
cancellation and interrupts at every step as the real engine does (report, then
check; an interrupt keeps the images and skips the rest), and returns
deterministic images: the same seed and prompt give the same pixels. A run of
several requests steps them together, as the real engine's shared pass does: a
cancelled one is let go with `Cancelled`, the others go on.
`pause_at(step)` holds a run after that base step until `resume()` or a cancel,
so tests wait on an event instead of guessing how long a job takes.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

from PIL import Image

from sdxl_refinery import ImageService
from sdxl_refinery.batching import Run, RunItem
from sdxl_refinery.engine.passes import EngineOutput, Outcome
from sdxl_refinery.errors import Cancelled
from sdxl_refinery.loras import LoraFile
from sdxl_refinery.request import CancelToken, GenerationRequest, Precision, Progress
from sdxl_refinery.steps import plan_steps


@dataclass(frozen=True)
class FakePlacement:
    device: str = "cpu"
    precision: Precision = Precision.FULL
    precision_name: str = "fp32"
    reason: str = "fake engine for server tests"


class FakeEngine:
    """Deterministic images after the planned steps; see the module docstring."""

    placement = FakePlacement()
    encoder_layers = 3  # as the tiny pair's text encoders: the deepest clip skip it takes

    def __init__(self) -> None:
        self.models = {"base": "fake-base", "base_source": "folder:fake-base", "refiner": "fake-refiner",
                       "refiner_source": "folder:fake-refiner", "base_hash": "0123456789",
                       "refiner_hash": "9876543210"}  # fmt: skip
        self.optimizations: list[str] = []
        self.runs: list[GenerationRequest] = []
        self.batches: list[list[GenerationRequest]] = []  # the requests of each engine run, in order
        self.loras: list[list[tuple[LoraFile, float]]] = []  # the checked LoRAs each run was given
        self._pause_at: int | None = None
        self._stubborn = False
        self._resume = threading.Event()
        self.paused = threading.Event()  # set while a run is held at the pause step

    def pause_at(self, step: int, stubborn: bool = False) -> None:
        """Hold the next runs after base step `step` (0: before the first) until `resume()` or a cancel
        (`stubborn`: until `resume()` only, like a CPU step that takes its time whatever is asked)."""
        self._pause_at = step
        self._stubborn = stubborn
        self._resume.clear()

    def resume(self, then_pause_at: int | None = None) -> None:
        """Release the run held now; `then_pause_at` holds the next run after that base step."""
        held, self._resume = self._resume, threading.Event()
        self._pause_at = then_pause_at
        if then_pause_at is None:
            self._resume.set()
        held.set()

    def _hold_all(self, items: list[RunItem]) -> None:
        """Hold until `resume()`, or until every item is cancelled or interrupted (unless stubborn)."""
        self.paused.set()
        released = self._resume
        try:
            while not released.wait(0.01):
                tokens = [item.cancel for item in items if item.cancel is not None]
                if (len(tokens) == len(items) and all(t.cancelled or t.interrupted for t in tokens)
                        and not self._stubborn):  # fmt: skip
                    return
        finally:
            self.paused.clear()

    def run(self, run: Run) -> list[Outcome]:
        requests = [item.request for item in run.items]
        self.runs.extend(requests)
        self.batches.append(requests)
        self.loras.extend([list(run.loras)] * len(requests))
        plan = plan_steps(requests[0])
        started = time.perf_counter()
        if self._pause_at == 0:
            self._hold_all(run.items)
        live = list(range(len(run.items)))
        executed = [{stage: 0 for stage in plan.totals} for _ in run.items]
        gone: dict[int, Outcome] = {}
        for stage, total in plan.totals.items():
            for step in range(1, total + 1):
                live = [index for index in live if not _stopped(run.items[index].cancel)]
                if not live:
                    break
                for index in live:
                    item = run.items[index]
                    preview = _image(item.request, item.seeds[0], 64) if item.preview_every and \
                        step % item.preview_every == 0 else None  # fmt: skip
                    if item.on_progress is not None:
                        item.on_progress(Progress(stage, step, total, time.perf_counter() - started, 0.0, preview))
                    executed[index][stage] = step
                if stage == 1 and step == self._pause_at:
                    self._hold_all([run.items[index] for index in live])
                for index in live:
                    cancel = run.items[index].cancel
                    if cancel is not None and cancel.cancelled:
                        if len(run.items) == 1:
                            cancel.raise_if_cancelled()
                        gone[index] = Cancelled("cancelled by request")
        outcomes: list[Outcome] = []
        for index, item in enumerate(run.items):
            if index in gone or (item.cancel is not None and item.cancel.cancelled):
                if len(run.items) == 1:
                    raise Cancelled("cancelled by request")
                outcomes.append(gone.get(index, Cancelled("cancelled by request")))
                continue
            interrupted = item.cancel is not None and item.cancel.interrupted
            images = [_image(item.request, seed) for seed in item.seeds]
            timings = {"base": 0.0, "refiner": 0.0, "decode": 0.0, "total": time.perf_counter() - started}
            refined = item.request.use_refinement and not interrupted
            done = executed[index]
            outcomes.append(EngineOutput(images, done[1], done.get(2, 0), refined, None, timings,
                                         interrupted=interrupted))  # fmt: skip
        return outcomes


def _stopped(cancel: CancelToken | None) -> bool:
    return cancel is not None and (cancel.cancelled or cancel.interrupted)


def _image(request: GenerationRequest, seed: int, size: int | None = None) -> Image.Image:
    digest = hashlib.sha256(f"{seed}:{request.prompt}".encode()).digest()
    width, height = (size, size) if size else request.output_size
    image = Image.new("RGB", (width, height), tuple(digest[:3]))
    image.paste(tuple(digest[3:6]), (0, 0, width // 2, height // 2))
    return image


def fake_service() -> tuple[ImageService, FakeEngine]:
    """A service over a fresh fake engine (loaded on first use, like the real one)."""
    engine = FakeEngine()
    return ImageService(
        "fake-base", "fake-refiner", device="cpu", precision="full", engine_factory=lambda: engine
    ), engine
