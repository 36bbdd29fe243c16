"""What a sampler costs per step: the full-size SDXL base UNet driven by each sampler, in the same run.

    python bench/samplers.py --device cpu --resolution 512 --json bench/results/samplers-cpu-2core.json
    python bench/samplers.py --quick      # the tiny UNet: a smoke run

Each sampler runs the denoising loop the way the SDXL pipeline does (scale the input,
one UNet call on the CFG batch of two, guidance, `scheduler.step`) over the engine's
own schedulers (`engine/schedulers.make_scheduler`), with random weights: timings do
not depend on weight values. Per sampler: seconds per step (median over the steps
after the first), seconds per model evaluation, and the scheduler's own share
(`scheduler.step` alone). Heun-like samplers evaluate the model twice a step; that is
their own work, reported as evaluations per step.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_SAMPLERS = ["Euler", "DPM++ 2M SDE", "Heun"]


def measure(unet: Any, config: Any, sampler: str, schedule: str, steps: int, latent: int, device: str,
            dtype: Any) -> dict[str, Any]:  # fmt: skip
    """One sampler's loop of `steps` steps on `unet`, timed per model evaluation and per scheduler step."""
    import torch

    from sdxl_refinery.engine.schedulers import make_scheduler
    from sdxl_refinery.samplers import Sampler, ScheduleType

    scheduler = make_scheduler(config, Sampler(sampler), ScheduleType(schedule))
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=generator).to(device, dtype) * scheduler.init_noise_sigma
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
             "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}  # fmt: skip
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    evaluations: list[float] = []
    stepping: list[float] = []
    with torch.no_grad():
        for timestep in scheduler.timesteps:
            started = time.perf_counter()
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
            noise = unet(model_input, timestep, encoder_hidden_states=context, added_cond_kwargs=added,
                         return_dict=False)[0]  # fmt: skip
            uncond, text = noise.chunk(2)
            noise = uncond + 7.0 * (text - uncond)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            evaluated = time.perf_counter()
            latents = scheduler.step(noise, timestep, latents, return_dict=False, **extra)[0]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            evaluations.append(evaluated - started)
            stepping.append(time.perf_counter() - evaluated)
    per_step_evaluations = len(scheduler.timesteps) / steps
    after_first = evaluations[1:] or evaluations
    evaluation_s = statistics.median(after_first)
    step_s = statistics.median(stepping[1:] or stepping)
    return {"sampler": sampler, "schedule": schedule, "steps": steps, "evaluations": len(scheduler.timesteps),
            "evaluations_per_step": round(per_step_evaluations, 3), "evaluation_s": evaluation_s,
            "scheduler_step_s": step_s, "step_s": per_step_evaluations * (evaluation_s + step_s),
            "first_evaluation_s": evaluations[0]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    parser.add_argument("--schedule", default="Automatic")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.steps = 256, 3

    from bench.run import _components, _machine
    from sdxl_refinery.engine.device import choose_placement
    from sdxl_refinery.engine.single_file import shipped_config

    placement = choose_placement(args.device, "auto")
    unet = _components("sdxl-base", args.quick, placement.dtype, placement.device)["unet"]
    config = shipped_config("sdxl-base")["scheduler"]
    rows = [measure(unet, config, name, args.schedule, args.steps, args.resolution // 8, placement.device,
                    placement.dtype) for name in args.samplers]  # fmt: skip
    reference = rows[0]
    for row in rows:
        row["evaluation_vs_first"] = round(row["evaluation_s"] / reference["evaluation_s"], 3)
        row["step_vs_first"] = round(row["step_s"] / reference["step_s"], 3)
        row["scheduler_share"] = round(row["scheduler_step_s"] / (row["evaluation_s"] + row["scheduler_step_s"]), 5)
    report = {"machine": _machine(), "device": placement.device, "dtype": str(placement.dtype).removeprefix("torch."),
              "resolution": args.resolution, "quick": args.quick, "rows": rows}  # fmt: skip
    for row in rows:
        print(
            f"{row['sampler']:>14} {row['schedule']}: {row['step_s']:.3f} s/step ({row['step_vs_first']}x "
            f"{reference['sampler']}), {row['evaluations_per_step']} evaluations/step, evaluation "
            f"{row['evaluation_s']:.3f} s ({row['evaluation_vs_first']}x), scheduler.step "
            f"{row['scheduler_step_s'] * 1000:.2f} ms ({row['scheduler_share'] * 100:.3f}%)"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
