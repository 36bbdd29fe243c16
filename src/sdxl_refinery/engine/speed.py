"""Speed without touching the maths: CPU threads, memory layout, fused projections, compilation.

Each option computes the same function as the plain model, up to float rounding
(the equivalence tests hold every one of them to the fp32 reference). None skips
a step or approximates. `auto` follows what was measured (docs/performance.md):

- threads: one per CPU this process may use (affinity and cgroup quota), not one
  per CPU the machine has: oversubscribed threads only wait on each other.
- channels_last: on for CUDA (cuDNN's fast convolution layout); off on CPU, where
  oneDNN already reorders: 0.97x per base step at 512 (bench/options.py).
- fused QKV: one projection GEMM instead of three per self-attention; on for CUDA;
  off on CPU, 0.90x there.
- compile: `torch.compile` of both UNets (and the VAE decoder on CUDA), with CUDA
  graphs where shapes are static; only `on` turns it on. On an H200 the eager fp16
  recipe takes 5.3 s per 1024 image, and max-autotune's warm-up did not finish in
  200 s for one UNet and shape (100 s was not enough even for the tiny pair): minutes
  per new size before a first image, for a gain not yet measured. On CPU (inductor
  with frozen, prepacked weights) it measured 1.09x per base step at 512, for 2.4 to
  4 minutes of compilation per UNet and image shape and 21.9 GiB peak RSS at 1024.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..options import SpeedOptions, Toggle
from .device import Placement

log = logging.getLogger(__name__)

CUDA_COMPILE_MODE = "max-autotune"  # inductor's autotuned kernels, with CUDA graphs for static shapes
CPU_COMPILE_MODE = "frozen"  # inductor with the weights frozen into the graph and prepacked for oneDNN


@dataclass(frozen=True)
class SpeedPlan:
    """What the policy decided for one device."""

    threads: int | None  # torch intra-op threads on CPU; None leaves torch's choice (accelerators)
    channels_last: bool
    fused_qkv: bool
    compile_mode: str | None  # None runs eagerly

    def names(self) -> list[str]:
        """The optimizations this plan turns on, as recorded in results."""
        names = [f"threads={self.threads}"] if self.threads else []
        names += ["channels-last"] if self.channels_last else []
        names += ["fused-qkv"] if self.fused_qkv else []
        names += [f"compiled({self.compile_mode})"] if self.compile_mode else []
        return names


def _cgroup_cpu_limit(cgroup_root: Path) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` quota, or None when unlimited or unknown."""
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def usable_cpus(affinity: set[int] | None = None, cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup quota (at least 1)."""
    allowed = len(affinity if affinity is not None else os.sched_getaffinity(0))
    limit = _cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        allowed = min(allowed, max(1, math.floor(limit)))
    return max(1, allowed)


def _decide(toggle: str, auto: bool) -> bool:
    return {Toggle.ON: True, Toggle.OFF: False}.get(Toggle(toggle), auto)


def choose_speed_plan(placement: Placement, options: SpeedOptions | None = None, offload: bool = False) -> SpeedPlan:
    """Apply the speed policy for `placement` (see the module docstring).

    Args:
        offload: the memory plan moves weights between devices during a run; compilation is then off
            even when asked for, since CUDA graphs replay fixed memory addresses.
    """
    options = options or SpeedOptions()
    cuda = placement.device.startswith("cuda")
    cpu = placement.device == "cpu"
    threads = (options.threads or usable_cpus()) if cpu else None
    compile_on = _decide(options.compile, auto=False)
    if compile_on and offload and cuda:
        log.warning("compile=on is not applied under CPU offload: CUDA graphs replay fixed weight addresses")
        compile_on = False
    return SpeedPlan(
        threads=threads,
        channels_last=_decide(options.channels_last, auto=cuda),
        fused_qkv=_decide(options.fused_qkv, auto=cuda),
        compile_mode=(CUDA_COMPILE_MODE if cuda else CPU_COMPILE_MODE) if compile_on else None,
    )


def apply_speed_plan(unets: list[Any], vae: Any | None, plan: SpeedPlan) -> list[Any]:
    """Configure the models for `plan`; returns the UNets to use (compiled ones are wrappers).

    `vae` may be None when it was configured already (it is shared by both stages).

    Order matters: layout and fusion change the modules, compilation then traces them.
    """
    if plan.threads:
        torch.set_num_threads(plan.threads)
    if plan.channels_last:
        for module in [*unets, vae] if vae is not None else unets:
            module.to(memory_format=torch.channels_last)
    if plan.fused_qkv:
        for unet in unets:
            unet.fuse_qkv_projections()
        if vae is not None:
            vae.fuse_qkv_projections()
    if plan.compile_mode is None:
        return unets
    if plan.compile_mode == CPU_COMPILE_MODE:
        # Set process-wide on purpose: dynamo reads this flag while tracing, to keep the weights as constants
        # inductor can fold and prepack. Passed as torch.compile(options=...) it reaches inductor only, and
        # measured no gain. Runs that need other weights (the fp32 retry) use the plain modules.
        torch._inductor.config.freezing = True
        compiled = [torch.compile(unet, fullgraph=True) for unet in unets]
    else:
        compiled = [torch.compile(unet, mode=plan.compile_mode, fullgraph=True) for unet in unets]
        if vae is not None:
            vae.decoder = torch.compile(vae.decoder, mode=plan.compile_mode, fullgraph=True)
    log.info("Compiling the UNets (%s): the first run of each new image shape takes longer", plan.compile_mode)
    return compiled


def is_compiled(module: Any) -> bool:
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule)


def active_optimizations(unets: list[Any], vae: Any) -> list[str]:
    """What is in effect, read from the models themselves (not from the plan that asked for it)."""
    plain = [getattr(unet, "_orig_mod", unet) for unet in unets]
    found = [f"threads={torch.get_num_threads()}"] if all(unet.device.type == "cpu" for unet in plain) else []
    if all(unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) for unet in plain):
        found.append("channels-last")
    if all(_fused(unet) for unet in plain):
        found.append("fused-qkv")
    if all(is_compiled(unet) for unet in unets):
        found.append("compiled")
    return found


def _fused(unet: Any) -> bool:
    """Every attention layer projects through its fused weights (a later processor swap would undo it)."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    return all(isinstance(processor, FusedAttnProcessor2_0) for processor in unet.attn_processors.values())
