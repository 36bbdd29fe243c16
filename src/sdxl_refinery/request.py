"""The words every floor shares: requests, results, progress and the enums.

All validation of user input lives here, so the library, the command line,
every HTTP route, the queue payload and the web form accept and refuse exactly
the same things. A bad field raises `InvalidRequest` naming the field and the
rule before any model work starts.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Cancelled, InvalidRequest

MIN_SIZE = 256
MAX_SIZE = 4096
MAX_STEPS = 500
MAX_IMAGES = 16
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1


class Mode(str, Enum):
    """How the refiner takes over from the base."""

    SEQUENTIAL = "sequential"  # base runs to the end, refiner does img2img on its latents
    HANDOFF = "handoff"  # ensemble of experts: refiner finishes the base's schedule


class Precision(str, Enum):
    """Numeric precision policy of the models."""

    AUTO = "auto"
    FULL = "full"  # fp32
    HALF = "half"  # fp16
    BF16 = "bf16"


class Toggle(str, Enum):
    """A speed option: the measured policy (`auto`), or forced on or off."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def validate_device(device: str) -> str:
    """Return `device` if it names a device Refinery knows.

    Raises:
        InvalidRequest: for anything but auto, cpu, mps, cuda or cuda:N.
    """
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise InvalidRequest("device", f"must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
    return device


def validate_precision(precision: str) -> Precision:
    """Return the `Precision` named by `precision`.

    Raises:
        InvalidRequest: for anything but auto, full, half or bf16.
    """
    try:
        return Precision(precision)
    except ValueError:
        allowed = ", ".join(p.value for p in Precision)
        raise InvalidRequest("precision", f"must be one of {allowed}, not {precision!r}") from None


def validate_toggle(field_name: str, value: str) -> Toggle:
    """Return the `Toggle` named by `value`.

    Raises:
        InvalidRequest: naming `field_name`, for anything but auto, on or off.
    """
    try:
        return Toggle(value)
    except ValueError:
        raise InvalidRequest(field_name, f"must be one of auto, on, off, not {value!r}") from None


@dataclass(frozen=True)
class SpeedOptions:
    """What was asked for: `auto`, `on` or `off` each; `threads` 0 means one per usable CPU.

    Raises:
        InvalidRequest: a toggle that is not `auto`, `on` or `off`, or negative threads.
    """

    compile: str = "auto"
    channels_last: str = "auto"
    fused_qkv: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("compile", "channels_last", "fused_qkv"):
            validate_toggle(name, getattr(self, name))
        if self.threads < 0:
            raise InvalidRequest("threads", f"must be 0 (one per usable CPU) or more, got {self.threads}")


class GenerationRequest(BaseModel):
    """One prompt to render: every field a face can set, validated on construction.

    Raises:
        InvalidRequest: on construction, naming the first bad field and its rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)

    prompt: str = Field(description="What to draw; must not be blank.")
    negative_prompt: str = Field("", description="What to keep out of the image.")
    width: int = Field(1024, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8)
    height: int = Field(1024, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8)
    num_inference_steps: int = Field(50, ge=1, le=MAX_STEPS, description="Base model steps.")
    refiner_steps: int = Field(30, ge=1, le=MAX_STEPS, description="Refiner steps actually executed.")
    refiner_strength: float = Field(0.3, gt=0.0, le=1.0, description="Share of the schedule the refiner redoes.")
    mode: Mode = Mode.SEQUENTIAL
    switch_at: float = Field(0.8, gt=0.0, lt=1.0, description="Handoff point, as a share of the schedule.")
    guidance_scale: float = Field(8.0, ge=0.0, le=MAX_GUIDANCE)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="First image's seed; random when absent.")
    n: int = Field(1, ge=1, le=MAX_IMAGES, description="Images in this request, seeds seed, seed+1, ...")
    use_refinement: bool = True
    aesthetic_score: float = Field(6.0, ge=0.0, le=10.0)
    negative_aesthetic_score: float = Field(2.5, ge=0.0, le=10.0)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise invalid_request_from(error) from None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or blank")
        return value

    @model_validator(mode="after")
    def _handoff_leaves_both_stages_a_step(self) -> GenerationRequest:
        if self.use_refinement and self.mode is Mode.HANDOFF:
            base = handoff_base_steps(self.num_inference_steps, self.switch_at)
            if base in (0, self.num_inference_steps):
                stage = "base" if base == 0 else "refiner"
                raise ValueError(
                    f"switch_at: {self.switch_at} leaves the {stage} no step out of "
                    f"num_inference_steps={self.num_inference_steps}"
                )
        return self

    def seeds_or_none(self) -> list[int] | None:
        """The seeds of all `n` images, or None when the seed is left random."""
        if self.seed is None:
            return None
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


def handoff_base_steps(steps: int, switch_at: float, train_steps: int = 1000) -> int:
    """Base steps before `switch_at` under SDXL's Euler schedule ("leading" spacing, offset 1).

    The engine recomputes this from the loaded scheduler; this copy lets a bad switch point be refused
    when the request is made, before it is queued.
    """
    ratio = train_steps // steps
    timesteps = [i * ratio + 1 for i in range(steps)]
    cutoff = round(train_steps - switch_at * train_steps)
    return sum(1 for t in timesteps if t >= cutoff)


def invalid_request_from(error: ValidationError) -> InvalidRequest:
    """Turn pydantic's first validation error into an `InvalidRequest`."""
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "request"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not first["loc"] and ": " in message:  # a rule across fields names its field in the message
        name, message = message.split(": ", 1)
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    return InvalidRequest(name, message)


@dataclass(frozen=True)
class Limits:
    """A server's own caps, tighter than the request's hard rules (settings `max_*`)."""

    max_width: int = MAX_SIZE
    max_height: int = MAX_SIZE
    max_steps: int = MAX_STEPS
    max_images: int = MAX_IMAGES


def enforce_limits(request: GenerationRequest, limits: Limits) -> GenerationRequest:
    """Return `request` if it fits `limits`.

    Raises:
        InvalidRequest: naming the first field over its cap.
    """
    checks = (
        ("width", request.width, limits.max_width),
        ("height", request.height, limits.max_height),
        ("num_inference_steps", request.num_inference_steps, limits.max_steps),
        ("refiner_steps", request.refiner_steps, limits.max_steps),
        ("n", request.n, limits.max_images),
    )
    for name, value, cap in checks:
        if value > cap:
            raise InvalidRequest(name, f"must be at most {cap} on this server, not {value}")
    return request


@dataclass(frozen=True)
class Progress:
    """One denoising step done.

    Attributes:
        stage: 1 for the base, 2 for the refiner.
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
        return "base" if self.stage == 1 else "refiner"


ProgressCallback = Callable[[Progress], None]


class CancelToken:
    """A flag a run checks at every step; thread-safe, set from any thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

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
        precision: the precision the run used, e.g. `bf16`.
        timings: seconds per stage (`base`, `refiner`, `decode`) and `total`.
        request: the request this result answers.
        models: the resolved base and refiner references.
        paths: files written for this result, if any.
        memory_plan: how memory was used (`resident` unless an out-of-memory error forced a lighter plan).
        recoveries: faults survived on the way (NaN retried in fp32, lighter memory plans), in words.
        optimizations: speed options in effect, read from the models (`threads=2`, `compiled`, ...).
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
    models: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    memory_plan: str = "resident"
    recoveries: list[str] = field(default_factory=list)
    optimizations: list[str] = field(default_factory=list)

    def metadata(self) -> dict[str, Any]:
        """Everything but the pixels, as plain JSON-able data."""
        return {
            "request": self.request.model_dump(mode="json"),
            "seeds": list(self.seeds),
            "base_steps": self.base_steps,
            "refiner_steps": self.refiner_steps,
            "refined": self.refined,
            "refinement_error": self.refinement_error,
            "device": self.device,
            "precision": self.precision,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "models": dict(self.models),
            "memory_plan": self.memory_plan,
            "recoveries": list(self.recoveries),
            "optimizations": list(self.optimizations),
        }
