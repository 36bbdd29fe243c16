"""Recovering from numerical and memory faults without lowering quality by default.

- NaN/Inf in latents or pixels: decode again with the VAE in fp32, then run the
  stage again in fp32; only then fail. A black or NaN image is never a success.
- Out of memory in a stage: free memory and run again under the next lighter
  memory plan. Plans only change how memory is used: attention and VAE slicing
  compute the same result in pieces; VAE tiling (blended tiles) and CPU offload
  are used only after a real out-of-memory error, and every result says which
  plan made it.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryPlan:
    """How the pipelines use memory. `name` goes into results."""

    name: str
    slicing: bool = False  # attention in slices, VAE one image at a time: same maths, lower peak
    tiling: bool = False  # VAE decode in blended tiles
    offload: str | None = None  # "model" or "sequential" CPU offload (CUDA only)


PLANS = (
    MemoryPlan("resident"),
    MemoryPlan("sliced", slicing=True),
    MemoryPlan("tiled", slicing=True, tiling=True),
    MemoryPlan("model-offload", slicing=True, offload="model"),  # decode has the GPU to itself: no tiles needed
    MemoryPlan("sequential-offload", slicing=True, tiling=True, offload="sequential"),
)


def plans_for(device: str) -> tuple[MemoryPlan, ...]:
    """The plans worth trying on `device`, lightest last (offload needs an accelerator)."""
    return PLANS if device.startswith("cuda") else tuple(plan for plan in PLANS if plan.offload is None)


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory, or a CPU allocation failure, as PyTorch reports them."""
    if isinstance(error, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class NonFinite(Exception):
    """NaN or Inf where a stage or the VAE should have produced numbers."""


def free_memory() -> None:
    """Drop what can be dropped before a retry."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def apply_plan(pipes: tuple[Any, Any], plan: MemoryPlan, device: str) -> None:
    """Configure both pipelines for `plan` (idempotent; savings already switched on stay on)."""
    for pipe in pipes:
        if plan.slicing:
            pipe.enable_attention_slicing()
            pipe.vae.enable_slicing()
        if plan.tiling:
            pipe.vae.enable_tiling()
        if plan.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif plan.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)


def all_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all().item())


@contextlib.contextmanager
def upcast(*modules: Any) -> Iterator[bool]:
    """Run with `modules` in fp32, restoring their dtypes after. Yields False when all already were fp32."""
    originals = [(module, module.dtype) for module in modules]
    changed = any(dtype != torch.float32 for _, dtype in originals)
    try:
        for module, _ in originals:
            module.to(torch.float32)
        yield changed
    finally:
        for module, dtype in originals:
            module.to(dtype)
