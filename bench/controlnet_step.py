"""ControlNet's cost measured: one denoising step of the full-size SDXL base UNet (random weights) with
classifier-free guidance (batch 2), alone and with a full-size SDXL ControlNet (made from that UNet, as
diffusers' `ControlNetModel.from_unet` makes one) adding its residuals, in the same run.

    python bench/controlnet_step.py --size 512 --repeats 2 --json bench/results/controlnet-step-cpu.json
    python bench/controlnet_step.py --device cuda --dtype fp16 --size 1024 --repeats 10   # a lent GPU (gpu.sh)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name, report


def main() -> None:
    import torch
    from diffusers import ControlNetModel

    from bench.run import _one_component

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = args.device
    unet = _one_component("sdxl-base", "unet", dtype, device).eval()
    controlnet = ControlNetModel.from_unet(unet).to(device, dtype).eval()
    latent = args.size // 8
    options = {"dtype": dtype, "device": device}
    sample = torch.randn(2, 4, latent, latent, **options)
    context = torch.randn(2, 77, 2048, **options)
    added = {"text_embeds": torch.randn(2, 1280, **options), "time_ids": torch.randn(2, 6, **options)}
    control = torch.rand(2, 3, args.size, args.size, **options)
    step = torch.tensor(500, device=device)

    def synchronized() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> None:
        unet(sample, step, encoder_hidden_states=context, added_cond_kwargs=added)

    def guided() -> None:
        down, mid = controlnet(sample, step, encoder_hidden_states=context, controlnet_cond=control,
                               added_cond_kwargs=added, return_dict=False)  # fmt: skip
        unet(sample, step, encoder_hidden_states=context, added_cond_kwargs=added,
             down_block_additional_residuals=down, mid_block_additional_residual=mid)  # fmt: skip

    seconds: dict[str, list[float]] = {"plain": [], "controlnet": []}
    with torch.inference_mode():
        plain()  # warm-up: allocator and kernels
        for _ in range(args.repeats):  # interleaved, so that drift in the machine's speed hits both alike
            for name, work in (("plain", plain), ("controlnet", guided)):
                synchronized()
                started = time.perf_counter()
                work()
                synchronized()
                seconds[name].append(time.perf_counter() - started)
    result: dict[str, Any] = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": args.dtype,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "size": args.size, "batch": 2, "repeats": args.repeats,
        "unet_parameters_m": round(sum(p.numel() for p in unet.parameters()) / 1e6),
        "controlnet_parameters_m": round(sum(p.numel() for p in controlnet.parameters()) / 1e6),
        "plain_step_seconds": round(statistics.median(seconds["plain"]), 4),
        "controlnet_step_seconds": round(statistics.median(seconds["controlnet"]), 4),
    }  # fmt: skip
    result["controlnet_over_plain"] = round(result["controlnet_step_seconds"] / result["plain_step_seconds"], 3)
    report(result, args.json)


if __name__ == "__main__":
    main()
