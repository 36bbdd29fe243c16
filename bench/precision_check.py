"""Where does the device's half precision leave fp32? The tiny pair, same seed, fp16 variants against fp32.

    python bench/precision_check.py --device cuda --json precision.json

Runs the library at 1 base step, 50 base steps and the full recipe (50 + 30), fp32 first, then fp16 with
the VAE in fp32 (CUDA's default policy) under variants that each take one suspect away: the speed plan's
channels_last and fused QKV, fp16 reduced-precision matmul reductions, fused attention kernels. Prints
the max and mean pixel difference against fp32 for each; on CPU the same script checks the plumbing.

Then it traces one base step module by module (forward hooks on both text encoders and the UNet, fp32 and
fp16 on the same device, same seed) and names the first modules whose output leaves fp32 by more than
`--tolerance` (relative), or holds Inf/NaN: where a half-precision divergence starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

RECIPES = {"base_1_step": {"num_inference_steps": 1, "use_refinement": False},
           "base_50_steps": {"use_refinement": False}, "recipe_50_30": {}}  # fmt: skip


@contextlib.contextmanager
def _strict_kernels(on: bool) -> Iterator[None]:
    """fp32 accumulation in fp16 matmuls and the plain (math) attention kernel, when `on`."""
    if not on:
        yield
        return
    reduced = torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced


async def _images(service: Any, strict: bool, recipes: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    from sdxl_refinery import GenerationRequest

    images = {}
    for name, fields in recipes.items():
        with _strict_kernels(strict):
            result = await service.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=7, width=256,
                                                              height=256, **fields))  # fmt: skip
        images[name] = np.asarray(result.images[0], dtype=np.int16)
    return images


async def _check(device: str, half: str, quick: bool) -> dict[str, Any]:
    from sdxl_refinery import ImageService
    from sdxl_refinery.options import SpeedOptions

    recipes = {"base_1_step": RECIPES["base_1_step"]} if quick else RECIPES
    reference = await _images(ImageService("tiny", "tiny", device=device, precision="full",
                                           speed=SpeedOptions(compile="off")), False, recipes)  # fmt: skip
    variants = {"half_default_speed_plan": (SpeedOptions(compile="off"), False),
                "half_plain_models": (SpeedOptions(compile="off", channels_last="off", fused_qkv="off"), False),
                "half_plain_models_strict_kernels": (SpeedOptions(compile="off", channels_last="off",
                                                                  fused_qkv="off"), True)}  # fmt: skip
    report: dict[str, Any] = {}
    for name, (speed, strict) in list(variants.items())[: 1 if quick else None]:
        service = ImageService("tiny", "tiny", device=device, precision=half, speed=speed)
        images = await _images(service, strict, recipes)
        report[name] = {}
        for recipe, pixels in images.items():
            difference = np.abs(pixels - reference[recipe])
            report[name][recipe] = {"max": int(difference.max()), "mean": round(float(difference.mean()), 3)}
        print(name, json.dumps(report[name]), flush=True)
    return report


def _trace(service: Any, strict: bool) -> list[tuple[str, torch.Tensor]]:
    """Every module output of one base step (text encoders, UNet), in call order, as fp32 on CPU."""
    from sdxl_refinery import GenerationRequest

    base = service._engine.pair.base  # a diagnostic reads the loaded models
    outputs: list[tuple[str, torch.Tensor]] = []
    handles = []
    for part in ("text_encoder", "text_encoder_2", "unet"):
        for name, module in getattr(base, part).named_modules():

            def keep(_module: Any, _inputs: Any, output: Any, name: str = f"{part}.{name}") -> None:
                tensor = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    outputs.append((name, tensor.detach().float().cpu()))

            handles.append(module.register_forward_hook(keep))
    try:
        with _strict_kernels(strict):
            asyncio.get_event_loop().run_until_complete(service.generate(GenerationRequest(
                prompt="a lighthouse at dusk", seed=7, width=256, height=256, num_inference_steps=1,
                use_refinement=False)))  # fmt: skip
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _first_divergences(reference: list[tuple[str, torch.Tensor]], other: list[tuple[str, torch.Tensor]],
                       tolerance: float, count: int = 12) -> list[dict[str, Any]]:  # fmt: skip
    """The first `count` modules, in call order, whose output leaves the reference's."""
    found: list[dict[str, Any]] = []
    if len(reference) != len(other):
        found.append({"module": "-", "problem": f"{len(reference)} module calls against {len(other)}"})
    for (name, expected), (other_name, actual) in zip(reference, other, strict=False):
        if name != other_name or expected.shape != actual.shape:
            found.append({"module": name, "problem": f"call order differs: {other_name} {tuple(actual.shape)}"})
            break
        finite = bool(torch.isfinite(actual).all())
        scale = expected.abs().max().item() or 1.0
        error = (actual - expected).abs().max().item() / scale if finite else float("inf")
        if error > tolerance:
            found.append({"module": name, "relative_error": round(error, 5), "finite": finite,
                          "reference_absmax": round(scale, 4),
                          "absmax": round(actual.abs().max().item(), 4) if finite else None})  # fmt: skip
            if len(found) >= count:
                break
    return found


def trace(device: str, half: str, tolerance: float) -> dict[str, Any]:
    """Module-by-module comparison of one base step, fp16 (strict kernels, plain models) against fp32."""
    from sdxl_refinery import ImageService
    from sdxl_refinery.options import SpeedOptions

    plain = SpeedOptions(compile="off", channels_last="off", fused_qkv="off")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    traces = []
    for precision in ("full", half):
        service = ImageService("tiny", "tiny", device=device, precision=precision, speed=plain)
        loop.run_until_complete(service.load())
        traces.append(_trace(service, strict=True))
    return {"modules_traced": len(traces[0]), "tolerance": tolerance,
            "first_divergences": _first_divergences(traces[0], traces[1], tolerance)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--precision", help="the side compared with fp32 (default: half on CUDA, bf16 elsewhere)")
    parser.add_argument("--quick", action="store_true", help="one step, one variant, and the trace")
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative error that counts as leaving fp32")
    args = parser.parse_args()
    half = args.precision or ("half" if args.device.startswith("cuda") else "bf16")
    pixels = asyncio.run(_check(args.device, half, args.quick))
    traced = trace(args.device, half, args.tolerance)
    print("trace", json.dumps(traced, indent=1), flush=True)
    if args.json:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        report = {"torch": torch.__version__, "device": args.device, "gpu": gpu, "date": time.strftime("%Y-%m-%d"),
                  "compared": f"{half} against full (fp32)", "pixel_difference_vs_fp32": pixels,
                  "trace_one_base_step": traced}  # fmt: skip
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
