"""Refinery's own engine on a device, on the tiny random pair: does the whole path run there, and agree with CPU?

    python bench/gpu_smoke.py --device cuda --json smoke.json

The benchmark (bench/run.py) times bare UNets; this drives the library end to end (loading, placement,
precision policy, speed plan, both stages, samplers, batches, decode) the way a user does, on the device:

1. fp32 on the device against fp32 on CPU, same seed: max pixel difference (kernels differ, the maths not);
2. the default policy (fp16 with an fp32 VAE on CUDA, the device's speed plan): an image, no NaN recovery;
3. handoff mode, a second sampler and a batch of two under the default policy;
4. with `--compiled`: compile forced on (the CUDA speed plan: max-autotune, CUDA graphs), timed. On an
   H200 its warm-up on the tiny pair alone ran past 100 s, so it is asked for, not run by default.

Every case records its seconds, the precision and optimizations the result reports, and any error in
full; the exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


async def _run(service: Any, **fields: Any) -> tuple[Any, float]:
    from sdxl_refinery import GenerationRequest

    started = time.perf_counter()
    result = await service.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=7, width=256,
                                                      height=256, **fields))  # fmt: skip
    return result, time.perf_counter() - started


def _pixels(result: Any) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


def _describe(result: Any, seconds: float) -> dict[str, Any]:
    pixels = _pixels(result)
    return {"seconds": round(seconds, 3), "device": result.device, "precision": result.precision,
            "optimizations": list(result.optimizations), "recoveries": list(result.recoveries),
            "base_steps": result.base_steps, "refiner_steps": result.refiner_steps, "refined": result.refined,
            "images": len(result.images), "pixel_std": round(float(pixels.std()), 2)}  # fmt: skip


async def _cases(device: str, path: Path, with_compiled: bool, quick: bool) -> dict[str, Any]:
    import torch

    from sdxl_refinery import ImageService
    from sdxl_refinery.options import SpeedOptions

    cases: dict[str, Any] = {}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None

    async def case(name: str, work: Any) -> None:
        try:
            cases[name] = await work()
        except Exception as error:  # noqa: BLE001 - every case is reported, a failure in full
            cases[name] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
        print(name, json.dumps(cases[name])[:400], flush=True)
        # Written after every case: a stage stopped at its time limit keeps what it measured.
        report = {"torch": torch.__version__, "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "cases": cases}
        path.write_text(json.dumps(report, indent=2))

    off = SpeedOptions(compile="off")
    cpu = ImageService("tiny", "tiny", device="cpu", precision="full", speed=off)
    full = ImageService("tiny", "tiny", device=device, precision="full", speed=off)
    default = ImageService("tiny", "tiny", device=device, speed=off)

    async def fp32_agreement() -> dict[str, Any]:
        (mine, seconds), (reference, _) = await _run(full), await _run(cpu)
        difference = np.abs(_pixels(mine) - _pixels(reference))
        return {**_describe(mine, seconds), "max_pixel_diff_vs_cpu": int(difference.max()),
                "mean_pixel_diff_vs_cpu": round(float(difference.mean()), 4)}  # fmt: skip

    async def default_policy() -> dict[str, Any]:
        (mine, seconds), (reference, _) = await _run(default), await _run(cpu)
        difference = np.abs(_pixels(mine) - _pixels(reference))
        return {**_describe(mine, seconds), "max_pixel_diff_vs_cpu_fp32": int(difference.max()),
                "mean_pixel_diff_vs_cpu_fp32": round(float(difference.mean()), 4)}  # fmt: skip

    async def variety() -> dict[str, Any]:
        handoff = _describe(*await _run(default, mode="handoff"))
        sampler = _describe(*await _run(default, sampler="DPM++ 2M SDE", scheduler="Karras"))
        batch = _describe(*await _run(default, n=2))
        return {"handoff": handoff, "dpmpp_2m_sde_karras": sampler, "batch_of_2": batch}

    async def compiled() -> dict[str, Any]:
        service = ImageService("tiny", "tiny", device=device, speed=SpeedOptions(compile="on"))
        first = _describe(*await _run(service))
        second = _describe(*await _run(service))
        return {"first_run_with_compilation": first, "second_run": second}

    await case("fp32_on_device_vs_cpu", fp32_agreement)
    await case("default_policy", default_policy)
    if not quick:
        await case("handoff_sampler_batch", variety)
    if with_compiled:
        await case("compiled_default_policy", compiled)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / "smoke.json")
    parser.add_argument("--compiled", action="store_true", help="also run with compile on (minutes of warm-up)")
    parser.add_argument("--quick", action="store_true", help="cases 1 and 2 only (the test suite's run)")
    args = parser.parse_args()
    cases = asyncio.run(_cases(args.device, args.json, args.compiled, args.quick))
    raise SystemExit(1 if any("error" in case for case in cases.values()) else 0)


if __name__ == "__main__":
    main()
