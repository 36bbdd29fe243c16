"""A fake engine for tests whose subject is the server or the queue, not diffusion.

It runs the request's real step plan (`plan_steps`), reports every step, honours
cancellation and interrupts at every step as the real engine does (report, then
check; an interrupt keeps the images and skips the rest), and returns
deterministic images: the same seed and prompt give the same pixels.
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
from sdxl_refinery.engine.run import EngineOutput
from sdxl_refinery.loras import LoraFile
from sdxl_refinery.request import CancelToken, GenerationRequest, Precision, Progress, ProgressCallback
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

    def __init__(self) -> None:
        self.models = {"base": "fake-base", "base_source": "folder:fake-base", "refiner": "fake-refiner",
                       "refiner_source": "folder:fake-refiner", "base_hash": "0123456789",
                       "refiner_hash": "9876543210"}  # fmt: skip
        self.optimizations: list[str] = []
        self.runs: list[GenerationRequest] = []
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

    def resume(self) -> None:
        self._pause_at = None
        self._resume.set()

    def _hold(self, cancel: CancelToken | None) -> None:
        self.paused.set()
        try:
            while not self._resume.wait(0.01):
                if cancel is not None and (cancel.cancelled or cancel.interrupted) and not self._stubborn:
                    return
        finally:
            self.paused.clear()

    def run(
        self,
        request: GenerationRequest,
        seeds: list[int],
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
        loras: list[tuple[LoraFile, float]] | None = None,
    ) -> EngineOutput:
        self.runs.append(request)
        self.loras.append(list(loras or []))
        plan = plan_steps(request)
        started = time.perf_counter()
        if self._pause_at == 0:
            self._hold(cancel)
        executed = {stage: 0 for stage in plan.totals}
        for stage, total in plan.totals.items():
            for step in range(1, total + 1):
                if cancel is not None and cancel.interrupted:
                    break
                preview = _image(request, seeds[0], 64) if preview_every and step % preview_every == 0 else None
                if on_progress is not None:
                    on_progress(Progress(stage, step, total, time.perf_counter() - started, 0.0, preview))
                executed[stage] = step
                if stage == 1 and step == self._pause_at:
                    self._hold(cancel)
                if cancel is not None:
                    cancel.raise_if_cancelled()
        interrupted = cancel is not None and cancel.interrupted
        images = [_image(request, seed) for seed in seeds]
        timings = {"base": 0.0, "refiner": 0.0, "decode": 0.0, "total": time.perf_counter() - started}
        refined = request.use_refinement and not interrupted
        return EngineOutput(images, executed[1], executed.get(2, 0), refined, None, timings, interrupted=interrupted)


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
