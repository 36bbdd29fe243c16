"""What a run reports and returns: per-step progress, the cancel/interrupt token and the result.

Words every floor shares, beside the request (request.py re-exports them for the library's users).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

from .errors import Cancelled
from .options import Precision

if TYPE_CHECKING:
    from .request import GenerationRequest


STAGE_NAMES = {1: "base", 2: "refiner", 3: "upscale"}


@dataclass(frozen=True)
class Progress:
    """One denoising step done.

    Attributes:
        stage: 1 for the base, 2 for the refiner, 3 for an upscale job (a step is a tile).
        step: steps done in this stage (1-based).
        total: steps this stage will execute.
        elapsed: seconds since the run started.
        eta: estimated seconds left for the whole run (both stages).
        preview: a small approximate image of the current latents, when asked for.
    """

    stage: int
    step: int
    total: int
    elapsed: float
    eta: float
    preview: Image.Image | None = None

    @property
    def stage_name(self) -> str:
        return STAGE_NAMES.get(self.stage, "waiting")


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """Flags a run checks at every step; thread-safe, set from any thread.

    `cancel()` stops the run and discards it (`Cancelled` is raised); `interrupt()`
    stops it too but keeps what was made: the images are decoded from the
    latents as they stand (A1111's `/interrupt`).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._interrupt = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    def interrupt(self) -> None:
        """Stop within one step and keep the images as they stand (the refiner is skipped if not reached)."""
        self._interrupt.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def raise_if_cancelled(self) -> None:
        """Raises: Cancelled: once `cancel()` was called."""
        if self._event.is_set():
            raise Cancelled("cancelled by request")


@dataclass
class GenerationResult:
    """What a run produced.

    Attributes:
        images: one PIL image per requested image.
        seeds: the seed of each image.
        base_steps: base denoising steps executed.
        refiner_steps: refiner denoising steps executed (0 when not refined).
        refined: whether stage 2 ran to completion.
        refinement_error: why stage 2 did not run or failed, if it did not.
        device: the device the run used, e.g. `cpu` or `cuda:0`.
        precision: the precision the run used, for display, e.g. `fp16+fp32-vae`.
        precision_policy: the policy that gave it (`full`, `half`, `bf16`): what a repeat run asks for.
        timings: seconds per stage (`base`, `refiner`, `decode`) and `total`.
        request: the request this result answers.
        models: the resolved base and refiner references.
        paths: files written for this result, if any.
        memory_plan: how memory was used (`resident` unless an out-of-memory error forced a lighter plan).
        recoveries: faults survived on the way (NaN retried in fp32, lighter memory plans), in words.
        optimizations: speed options in effect, read from the models (`threads=2`, `compiled`, ...).
        interrupted: the run was interrupted (`CancelToken.interrupt`): the images are the latents as they
            stood, after `base_steps` + `refiner_steps` steps.
        loras: the LoRAs applied to the base model: name, weight and A1111's 12-digit hash of each.
        embeddings: the textual-inversion embeddings its prompts used: name and 12-digit hash of each.
    """

    images: list[Image.Image]
    seeds: list[int]
    base_steps: int
    refiner_steps: int
    refined: bool
    refinement_error: str | None
    device: str
    precision: str
    timings: dict[str, float]
    request: GenerationRequest
    precision_policy: Precision
    models: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    memory_plan: str = "resident"
    recoveries: list[str] = field(default_factory=list)
    optimizations: list[str] = field(default_factory=list)
    interrupted: bool = False
    loras: list[dict[str, Any]] = field(default_factory=list)
    embeddings: list[dict[str, Any]] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """Everything but the pixels, as plain JSON-able data."""
        return {
            "request": self.request.recorded(),
            "seeds": list(self.seeds),
            "base_steps": self.base_steps,
            "refiner_steps": self.refiner_steps,
            "refined": self.refined,
            "refinement_error": self.refinement_error,
            "device": self.device,
            "precision": self.precision,
            "precision_policy": self.precision_policy.value,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "models": dict(self.models),
            "memory_plan": self.memory_plan,
            "recoveries": list(self.recoveries),
            "optimizations": list(self.optimizations),
            "interrupted": self.interrupted,
            "loras": [dict(lora) for lora in self.loras],
            "embeddings": [dict(embedding) for embedding in self.embeddings],
        }
