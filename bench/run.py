"""Refinery against plain diffusers, on the full-size SDXL architecture with random weights.

    python bench/run.py --device cpu --resolution 512 1024 --steps 3 --json bench.json
    python bench/run.py --quick            # the tiny pair, seconds, to check the script works

Timings do not depend on weight values, so the real SDXL 1.0 configs (shipped in the package) are built
with random weights: no download is needed. Each side runs in its own process, so peak memory is its own.

- ours: Refinery's engine policy (bf16 on CPUs with native bf16, fp16 with an fp32 VAE on CUDA), one
  text_encoder_2 and VAE shared by base and refiner, latents handed from base to refiner;
- baseline: what a user of plain diffusers writes: two pipelines with their own encoders and VAEs, fp32 on
  CPU and fp16 on CUDA, the base image decoded to pixels and encoded again for the refiner.

Per-step times include classifier-free guidance (the UNet runs on a batch of 2n). On CPU the end-to-end
time of the documented recipe (50 base + 30 refiner steps) is extrapolated from the measured steps and
stated as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASE_STEPS, REFINER_STEPS = 50, 30
FIGURES = ("setup_s", "text_s", "base_step_s", "refiner_step_s", "decode_s", "encode_s", "end_to_end_s")


# ------------------------------------------------------------------------------------------ one side


def _components(kind: str, quick: bool, dtype: Any, device: str) -> dict[str, Any]:
    """UNet, VAE and text encoders of SDXL (or the tiny pair) with random weights, on `device` in `dtype`."""

    if quick:
        from sdxl_refinery.engine.tiny import build_tiny_pair

        base, refiner = build_tiny_pair(Path(tempfile.mkdtemp()))
        pipe = base if kind == "sdxl-base" else refiner
        parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder_2": pipe.text_encoder_2}
        if kind == "sdxl-base":
            parts["text_encoder"] = pipe.text_encoder
        return {name: part.to(device, dtype) for name, part in parts.items()}
    names = ["unet", "vae", "text_encoder_2"] + (["text_encoder"] if kind == "sdxl-base" else [])
    return {name: _one_component(kind, name, dtype, device) for name in names}


def _one_component(kind: str, name: str, dtype: Any, device: str = "cpu") -> Any:
    """One full-size SDXL component of `kind` (its shipped config) with random weights, in `dtype` on `device`."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl_refinery.engine.single_file import shipped_config

    config = shipped_config(kind)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype at once: peak memory is the side's own
    with init_empty_weights():
        builders = {"unet": lambda: UNet2DConditionModel.from_config(config["unet"]),
                    "vae": lambda: AutoencoderKL.from_config(config["vae"]),
                    "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])),
                    "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))}  # fmt: skip
        part = builders[name]()
    torch.set_default_dtype(default_dtype)
    part.to_empty(device=device)
    with torch.no_grad():
        for parameter in part.parameters():
            parameter.normal_(0.0, 0.02)
        for buffer_name, buffer in part.named_buffers():  # to_empty leaves buffers uninitialised
            if buffer_name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
            else:
                buffer.zero_()
    return part.to(dtype).eval()


def _timed(function: Any, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    return _timed_with_first(function, repeats)[0]


def _timed_with_first(function: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls after one warm-up call, and the warm-up's seconds (compilation)."""
    import torch

    def once() -> float:
        started = time.perf_counter()
        with torch.no_grad():
            function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    first = once()
    return statistics.median(once() for _ in range(max(repeats, 1))), first


def _unet_step(unet: Any, batch: int, latent: int, device: str, dtype: Any, time_ids: int) -> Any:
    import torch

    sample = torch.randn(2 * batch, 4, latent, latent, device=device, dtype=dtype)  # CFG doubles the batch
    context = torch.randn(2 * batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled = unet.config.projection_class_embeddings_input_dim - time_ids * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2 * batch, pooled, device=device, dtype=dtype),
             "time_ids": torch.randn(2 * batch, time_ids, device=device, dtype=dtype)}  # fmt: skip
    timestep = torch.tensor(500, device=device)
    return lambda: unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)


def measure_side(
    role: str, device: str, resolutions: list[int], steps: int, batches: list[int], quick: bool, compile_: str = "auto"
) -> dict:
    """All figures of one side, in this process."""
    import torch

    from sdxl_refinery.engine.device import choose_placement
    from sdxl_refinery.engine.speed import CPU_COMPILE_MODE, apply_speed_plan, choose_speed_plan
    from sdxl_refinery.request import SpeedOptions

    placement = choose_placement(device, "auto")
    ours = role == "ours"
    speed = choose_speed_plan(placement, SpeedOptions(compile=compile_)) if ours else None
    if ours:
        dtype, vae_dtype = placement.dtype, placement.vae_dtype
    else:
        dtype = torch.float16 if placement.device.startswith("cuda") else torch.float32
        vae_dtype = dtype
    device = placement.device
    results: dict[str, Any] = {"role": role, "device": device, "dtype": str(dtype).removeprefix("torch."),
                               "vae_dtype": str(vae_dtype).removeprefix("torch."), "resolutions": {},
                               "optimizations": speed.names() if speed else []}  # fmt: skip
    # Plain diffusers in fp32 needs both pipelines resident (about 26 GB of weights for SDXL), and frozen
    # compilation keeps a second copy of each UNet; where that does not fit in RAM the side is measured one
    # pipeline at a time and the output says so.
    frozen = speed is not None and speed.compile_mode == CPU_COMPILE_MODE
    needs_gib = 28 if not ours else (26 if frozen else 14)
    sequential = not quick and not device.startswith("cuda") and _ram_gib() < needs_gib
    results["one_pipeline_at_a_time"] = sequential
    started = time.perf_counter()
    base = _components("sdxl-base", quick, dtype, device)
    base["vae"].to(vae_dtype)
    setup = time.perf_counter() - started
    if speed:  # the engine's own speed plan for this device
        (base["unet"],) = apply_speed_plan([base["unet"]], base["vae"], speed)
    tokens = torch.randint(0, base["text_encoder"].config.vocab_size - 1, (1, 77), device=device)
    text_base = _timed(lambda: (base["text_encoder"](tokens), base["text_encoder_2"](tokens)), steps)
    rows: dict[str, dict[str, Any]] = {str(r): {} for r in resolutions}
    _measure_stage(base["unet"], "base", 6, rows, resolutions, batches, steps, device, dtype)
    for resolution in resolutions:
        latents = torch.randn(1, 4, resolution // 8, resolution // 8, device=device, dtype=vae_dtype)
        rows[str(resolution)]["decode_s"] = _timed(lambda latents=latents: base["vae"].decode(latents), 1)
    parameters = sum(p.numel() for part in base.values() for p in part.parameters())
    if sequential:  # ours keeps text_encoder_2 and the VAE, which the refiner shares
        for name in ("unet", "text_encoder") if ours else tuple(base):
            del base[name]
        import gc

        gc.collect()
    started = time.perf_counter()
    refiner = _components("sdxl-refiner", quick, dtype, device)
    setup += time.perf_counter() - started
    if speed:
        (refiner["unet"],) = apply_speed_plan([refiner["unet"]], None, speed)
    if ours:  # one copy of text_encoder_2 and the VAE
        refiner["text_encoder_2"], refiner["vae"] = base["text_encoder_2"], base["vae"]
        parameters += sum(p.numel() for p in refiner["unet"].parameters())
    else:
        refiner["vae"].to(vae_dtype)
        parameters += sum(p.numel() for part in refiner.values() for p in part.parameters())
    results["setup_s"] = setup
    text_refiner = _timed(lambda: refiner["text_encoder_2"](tokens), steps)
    _measure_stage(refiner["unet"], "refiner", 5, rows, resolutions, batches, steps, device, dtype)
    for resolution in resolutions:
        row = rows[str(resolution)]
        pixels = torch.randn(1, 3, resolution, resolution, device=device, dtype=vae_dtype)
        row["encode_s"] = 0.0 if ours else _timed(lambda pixels=pixels: refiner["vae"].encode(pixels), 1)
        for batch in _batches_at(resolution, resolutions, batches):
            # ours: one prompt encoding per stage, one decode; baseline: both, plus decode + encode between stages
            vae_work = batch * row["decode_s"] * (1 if ours else 2) + batch * row["encode_s"]
            row[f"end_to_end_s_n{batch}"] = (text_base + text_refiner + BASE_STEPS * row[f"base_step_s_n{batch}"]
                                             + REFINER_STEPS * row[f"refiner_step_s_n{batch}"] + vae_work)  # fmt: skip
            row[f"images_per_minute_n{batch}"] = 60.0 * batch / row[f"end_to_end_s_n{batch}"]
    results["resolutions"] = rows
    results["parameters_billion"] = parameters / 1e9
    results["weights_gib_resident"] = parameters * (2 if dtype != torch.float32 else 4) / 2**30
    results["text_s"] = text_base + text_refiner
    results["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    results["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return results


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _batches_at(resolution: int, resolutions: list[int], batches: list[int]) -> list[int]:
    """Batch sizes above 1 are measured at the smallest resolution only (they multiply the time)."""
    return batches if resolution == min(resolutions) else [b for b in batches if b == 1]


def _measure_stage(
    unet: Any, stage: str, time_ids: int, rows: dict[str, dict[str, Any]], resolutions: list[int],
    batches: list[int], steps: int, device: str, dtype: Any,
) -> None:  # fmt: skip
    for resolution in resolutions:
        for batch in _batches_at(resolution, resolutions, batches):
            step = _unet_step(unet, batch, resolution // 8, device, dtype, time_ids)
            row = rows[str(resolution)]
            row[f"{stage}_step_s_n{batch}"], row[f"{stage}_first_call_s_n{batch}"] = _timed_with_first(step, steps)


# ------------------------------------------------------------------------------------------ the report


def _machine() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def _run_side(role: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, __file__, "--side", role, "--device", args.device, "--steps", str(args.steps),
               "--resolution", *map(str, args.resolution), "--batch", *map(str, args.batch),
               "--compile", args.compile]  # fmt: skip
    if args.quick:
        command.append("--quick")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"role": role, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "crashed",
                "exit_code": done.returncode}  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare(ours: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Every figure with unit, ours, baseline, and baseline/ours (higher is better for us, except rates)."""
    figures: dict[str, Any] = {}

    def add(name: str, unit: str, mine: float | None, theirs: float | None, higher_is_better: bool = False) -> None:
        ratio = None
        if mine and theirs:
            ratio = round(mine / theirs if higher_is_better else theirs / mine, 3)
        figures[name] = {"unit": unit, "ours": mine, "baseline": theirs, "speedup": ratio}

    add("setup (random weights, no disk)", "s", ours.get("setup_s"), baseline.get("setup_s"))
    add("prompt encoding, both stages", "s", ours.get("text_s"), baseline.get("text_s"))
    add("peak RSS", "GiB", ours.get("peak_rss_gib"), baseline.get("peak_rss_gib"))
    add("peak CUDA memory", "GiB", ours.get("peak_cuda_gib"), baseline.get("peak_cuda_gib"))
    add("weights resident for both stages", "GiB", ours.get("weights_gib_resident"),
        baseline.get("weights_gib_resident"))  # fmt: skip
    for resolution, row in ours.get("resolutions", {}).items():
        other = baseline.get("resolutions", {}).get(resolution, {})
        for key, value in row.items():
            unit = "images/min" if key.startswith("images") else "s"
            add(f"{key} @{resolution}", unit, value, other.get(key), higher_is_better=unit == "images/min")
    return figures


def _plot(ours: dict[str, Any], baseline: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for side, label in ((ours, "Refinery"), (baseline, "plain diffusers")):
        rows = side.get("resolutions", {})
        if rows:
            sizes = sorted(rows, key=int)
            axes.plot([int(s) for s in sizes], [rows[s]["end_to_end_s_n1"] for s in sizes], marker="o", label=label)
    axes.set_xlabel("resolution (px, square)")
    axes.set_ylabel("seconds per image (50 + 30 steps)")
    axes.set_title("SDXL base + refiner, time per image")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, default=3, help="timed UNet calls per figure, after one warm-up")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quick", action="store_true", help="the tiny pair at 256 px: a smoke run")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile for our side (auto: the engine's policy for the device)",
    )
    parser.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.steps = [256], 1
    if args.side:
        side = measure_side(args.side, args.device, args.resolution, args.steps, args.batch, args.quick, args.compile)
        print(json.dumps(side))
        return
    ours = _run_side("ours", args)
    baseline = {} if args.skip_baseline else _run_side("baseline", args)
    for side in (ours, baseline):
        if "error" in side:
            print(f"{side['role']} side failed (exit {side['exit_code']}): {side['error']}", file=sys.stderr)
    figures = compare(ours, baseline)
    report = {"machine": _machine(), "command": " ".join(sys.argv), "quick": args.quick,
              "weights": "random (timings do not depend on weight values); SDXL 1.0 configs shipped in the package"
              if not args.quick else "the tiny random pair (smoke run only)",
              "end_to_end": "extrapolated from measured steps: text + 50 base + 30 refiner steps + VAE work",
              "ours": ours, "baseline": baseline, "figures": figures}  # fmt: skip
    print(f"{'figure':<40} {'unit':<11} {'ours':>10} {'baseline':>10} {'speedup':>8}")
    for name, figure in figures.items():
        cells = [f"{value:.3f}" if isinstance(value, float) else "-" for value in (figure["ours"], figure["baseline"])]
        speedup = f"{figure['speedup']:.2f}x" if figure["speedup"] else "-"
        print(f"{name:<40} {figure['unit']:<11} {cells[0]:>10} {cells[1]:>10} {speedup:>8}")
    print(report["weights"])
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        _plot(ours, baseline, args.plot)


if __name__ == "__main__":
    main()
