"""Choosing the memory plan up front, from the device's free memory.

Before the first run the engine compares what the pair needs (its weights, as
loaded, plus working memory for the largest image it serves) with the free
memory of the device, and starts on the lightest plan that is not needed:

- `resident`: both pipelines stay on the device (fastest);
- `sliced`: the same, with attention and VAE computed in slices (same maths, lower peak);
- `model-offload` (CUDA): each model moves to the GPU when its stage runs and the
  idle stage's UNet waits in CPU memory;
- `sequential-offload` (CUDA): weights stream to the GPU layer by layer.

The VAE decodes in tiles only when a decode would not fit in free memory
(blended tiles are close to, not exactly, the plain decode), and the result says so.
Out-of-memory errors still step to lighter plans at run time (recovery.py).

The working-memory figures are estimates from measurements (docs/performance.md):
about 2 KiB per output pixel per image in bf16 for the UNet stages, and 640
elements per output pixel per image for a VAE decode.
"""

from __future__ import annotations

from typing import Any

import psutil
import torch

from .recovery import MemoryPlan, plans_for

UNET_WORKING_BYTES_PER_PIXEL = 1024  # per byte of the compute dtype: 2 KiB/pixel in bf16
DECODE_ELEMENTS_PER_PIXEL = 640
GIB = 2**30


def free_bytes(device: str) -> int:
    """Free memory of `device`: available RAM for CPU/MPS, free + cached-but-unused VRAM for CUDA."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def module_bytes(modules: list[Any]) -> int:
    """Bytes of the distinct parameters and buffers of `modules` (shared parts count once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def unet_working_bytes(width: int, height: int, images: int, element_size: int) -> int:
    """Working memory of a UNet step with classifier-free guidance, estimated."""
    return UNET_WORKING_BYTES_PER_PIXEL * element_size * width * height * images


def decode_bytes(width: int, height: int, images: int, element_size: int) -> int:
    """Working memory of one VAE decode of `images` images, estimated."""
    return DECODE_ELEMENTS_PER_PIXEL * element_size * width * height * images


def choose_plan(device: str, weights: int, largest_part: int, working: int, free: int) -> tuple[MemoryPlan, str]:
    """The first plan of `plans_for(device)` that fits, and why.

    Args:
        weights: bytes of every model of the pair, as resident on the device.
        largest_part: bytes of the largest single model (a UNet), what model offload keeps on the device.
        working: working memory of a run at the largest size served.
        free: free bytes of the device now, before the models are placed on it.
    """
    plans = {plan.name: plan for plan in plans_for(device)}
    need = f"weights {weights / GIB:.1f} GiB + working {working / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
    if weights + working <= free:
        return plans["resident"], f"resident: {need}"
    if weights + working // 2 <= free or "model-offload" not in plans:
        return plans["sliced"], f"sliced (attention in slices, same maths): {need}"
    if largest_part + working <= free:
        return plans["model-offload"], f"model-offload (idle models wait in CPU memory): {need}"
    return plans["sequential-offload"], f"sequential-offload (weights stream layer by layer): {need}"


def initial_plan(
    device: str, weights: int, largest_part: int, element_size: int, weights_already_in_free: bool
) -> tuple[MemoryPlan, str]:
    """The plan to start on, chosen for the documented recipe (1024x1024, one image), and why.

    The engine calls this with the loaded pair's bytes and `refinery doctor` with the
    configured models' counted bytes, so both always pick the same plan.

    Args:
        device: where the models run.
        weights: bytes of every model of the pair.
        largest_part: bytes of the largest single model.
        element_size: bytes per element of the compute dtype.
        weights_already_in_free: the weights already sit in the memory being measured (loaded on CPU).
    """
    working = unet_working_bytes(1024, 1024, 1, element_size)
    free = free_bytes(device) + (weights if weights_already_in_free else 0)
    return choose_plan(device, weights, largest_part, working, free)


def describe_plans(device: str, precision: str, speed: Any, base_model: str, refiner_model: str) -> dict[str, Any]:
    """What the engine would choose for the configured pair, without loading it (for `refinery doctor`).

    Raises:
        InvalidRequest: unknown or absent device, unknown precision.
        ModelLoadError: a model reference cannot be resolved or its file is refused.
    """
    from .device import choose_placement
    from .inventory import configured_counts
    from .speed import choose_speed_plan

    placement = choose_placement(device, precision)
    counts, described = configured_counts(base_model, refiner_model)
    element_size = placement.dtype.itemsize
    need = sum(counts.values()) * element_size
    free = free_bytes(placement.device)
    _plan, reason = initial_plan(placement.device, need, max(counts.values()) * element_size, element_size, False)
    return {
        "device": placement.device,
        "precision": placement.precision_name,
        "why": placement.reason,
        "parameters": counts,
        "parameters_from": described,
        "weights_bytes_needed": need,
        "memory_label": "GPU memory free" if placement.device.startswith("cuda") else "RAM available",
        "memory_available_bytes": free,
        "fits": free > need,
        "memory_plan": reason,
        "speed_plan": choose_speed_plan(placement, speed).names(),
    }


def room_for_pair(base_model: str, refiner_model: str, device: str, precision: str) -> bool:
    """Whether another pair's weights fit in the device's free memory now (its configs counted on the meta
    device, a quarter to spare), so the service knows to release loaded pairs before loading it."""
    from .device import choose_placement
    from .inventory import configured_counts

    placement = choose_placement(device, precision)
    counts, _origin = configured_counts(base_model, refiner_model)
    need = sum(counts.values()) * placement.dtype.itemsize
    return need * 5 // 4 <= free_bytes(placement.device)
