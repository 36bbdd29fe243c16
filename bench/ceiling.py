"""How close one UNet step is to this machine's limit: where the time goes, in bf16 and fp32.

    python bench/ceiling.py --resolution 1024 --json bench/results/ceiling-cpu-2core.json

Profiles one SDXL base UNet step (random weights, classifier-free guidance batch of 2) in
bf16 and in fp32, groups the operator time into matrix multiplies (linear layers),
convolutions, attention and the rest, and measures the machine's matrix-multiply
throughput on the UNet's own largest GEMM shape in both precisions. From these it states:

- the share of each group, and each group's bf16/fp32 speedup;
- the achieved GFLOP/s of the linear layers against the GEMM microbenchmark (the kernel limit);
- the ceiling: the fp32 step divided by a bf16 step in which everything but the matrix
  multiplies, convolutions and attention took no time at all. No exact (same maths)
  optimisation can beat it on this machine with these kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GROUPS = {
    "linear (GEMM)": ("aten::addmm", "aten::mm", "aten::bmm"),
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math"),
}


def _gemm_gflops(dtype: Any, rows: int, inner: int, outer: int, repeats: int = 8) -> float:
    """Best GFLOP/s of a biased linear layer of this shape: the kernel's throughput on this machine."""
    import torch

    a = torch.randn(rows, inner, dtype=dtype)
    w = torch.randn(outer, inner, dtype=dtype)
    b = torch.randn(outer, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 2):  # the first calls allocate and warm the caches
        started = time.perf_counter()
        torch.nn.functional.linear(a, w, b)
        best = min(best, time.perf_counter() - started)
    return 2 * rows * inner * outer / best / 1e9


def _linear_flops(unet: Any, latent: int) -> float:
    """FLOPs of every nn.Linear in one UNet call, from the token counts at each level."""
    import torch

    flops = 0.0
    handles = []

    def count(module: torch.nn.Linear, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        nonlocal flops
        flops += 2.0 * inputs[0].numel() * module.out_features  # rows x in x out, twice (multiply, add)

    for module in unet.modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(count))
    from bench.run import _unet_step

    with torch.no_grad():
        _unet_step(unet, 1, latent, "cpu", unet.dtype, 6)()
    for handle in handles:
        handle.remove()
    return flops


def profile_step(dtype_name: str, resolution: int) -> dict[str, Any]:
    """Seconds per operator group for one base UNet step in `dtype_name`."""
    import torch

    from bench.run import _components, _unet_step

    dtype = getattr(torch, dtype_name)
    unet = _components("sdxl-base", False, dtype, "cpu")["unet"]
    step = _unet_step(unet, 1, resolution // 8, "cpu", dtype, 6)
    with torch.no_grad():
        step()  # warm-up
        started = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()
        wall = time.perf_counter() - started
    self_seconds = {event.key: event.self_cpu_time_total / 1e6 for event in profiler.key_averages()}
    total = sum(self_seconds.values())
    groups = {name: sum(self_seconds.get(op, 0.0) for op in ops) for name, ops in GROUPS.items()}
    groups["everything else"] = total - sum(groups.values())
    linear_flops = _linear_flops(unet, resolution // 8)
    return {"dtype": dtype_name, "step_s": wall, "profiled_s": total, "groups_s": groups,
            "linear_tflop": linear_flops / 1e12,
            "linear_gflops_achieved": linear_flops / groups["linear (GEMM)"] / 1e9}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from bench.run import _machine

    latent_tokens = 2 * (args.resolution // 16) ** 2  # CFG batch x tokens at the first attention level
    gemm = {name: _gemm_gflops(getattr(torch, name), latent_tokens, 640, 5120) for name in ("bfloat16", "float32")}
    bf16, fp32 = profile_step("bfloat16", args.resolution), profile_step("float32", args.resolution)
    exact_floor = sum(bf16["groups_s"][name] for name in GROUPS)
    report = {
        "machine": _machine(),
        "resolution": args.resolution,
        "weights": "random; SDXL 1.0 base UNet config shipped in the package",
        "gemm_gflops_microbenchmark": gemm,
        "bf16": bf16,
        "fp32": fp32,
        "group_speedup_bf16_over_fp32": {
            name: fp32["groups_s"][name] / bf16["groups_s"][name] for name in bf16["groups_s"] if bf16["groups_s"][name]
        },
        "step_speedup_bf16_over_fp32": fp32["step_s"] / bf16["step_s"],
        "ceiling_speedup_if_the_rest_were_free": fp32["step_s"] / exact_floor,
    }
    print(f"one SDXL base UNet step at {args.resolution}x{args.resolution}, CFG batch 2, {report['machine']['cpu']}")
    print(f"{'group':<20} {'bf16 s':>8} {'fp32 s':>8} {'speedup':>8}")
    for name in bf16["groups_s"]:
        b, f = bf16["groups_s"][name], fp32["groups_s"][name]
        print(f"{name:<20} {b:>8.2f} {f:>8.2f} {f / b if b else 0:>7.2f}x")
    speedup = report["step_speedup_bf16_over_fp32"]
    print(f"{'step (wall)':<20} {bf16['step_s']:>8.2f} {fp32['step_s']:>8.2f} {speedup:>7.2f}x")
    print(f"GEMM microbenchmark ({latent_tokens}x640 @ 640x5120): bf16 {gemm['bfloat16']:.0f} GFLOP/s, "
          f"fp32 {gemm['float32']:.0f} GFLOP/s; UNet linear layers achieved bf16 "
          f"{bf16['linear_gflops_achieved']:.0f}, fp32 {fp32['linear_gflops_achieved']:.0f} GFLOP/s")  # fmt: skip
    print(f"ceiling for exact bf16 (everything but GEMM, convolution, attention free): "
          f"{report['ceiling_speedup_if_the_rest_were_free']:.2f}x fp32 per step")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
