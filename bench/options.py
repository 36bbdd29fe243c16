"""Each speed option alone, on one full-size SDXL base UNet step, against the plain model in the same run.

    python bench/options.py --device cpu --resolution 512 --json bench/results/options-cpu-2core.json
    python bench/options.py --quick      # the tiny UNet: a smoke run

This is how the `auto` policy of `engine/speed.py` was decided: an option is on by default
for a device only where it measured faster there. Every variant runs in its own process
(fresh memory, fresh compiler caches) through the engine's own `apply_speed_plan`, with
random weights (timings do not depend on weight values). Times are medians of `--steps`
calls after one warm-up; the warm-up (which includes compilation) is reported apart.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "plain": {},
    "channels-last": {"channels_last": "on"},
    "fused-qkv": {"fused_qkv": "on"},
    "compiled": {"compile": "on"},
    "compiled+channels-last": {"compile": "on", "channels_last": "on"},
}


def measure_variant(name: str, device: str, resolution: int, steps: int, quick: bool) -> dict[str, Any]:
    """One variant, in this process: the engine's speed plan with only this option on."""
    from bench.run import _components, _timed_with_first, _unet_step
    from sdxl_refinery.engine.device import choose_placement
    from sdxl_refinery.engine.speed import apply_speed_plan, choose_speed_plan
    from sdxl_refinery.request import SpeedOptions

    placement = choose_placement(device, "auto")
    options = {"compile": "off", "channels_last": "off", "fused_qkv": "off", **VARIANTS[name]}
    plan = choose_speed_plan(placement, SpeedOptions(**options))
    unet = _components("sdxl-base", quick, placement.dtype, placement.device)["unet"]
    (unet,) = apply_speed_plan([unet], None, plan)
    step = _unet_step(unet, 1, resolution // 8, placement.device, placement.dtype, 6)
    median, first = _timed_with_first(step, steps)
    return {"variant": name, "optimizations": plan.names(), "dtype": str(placement.dtype).removeprefix("torch."),
            "step_s": median, "first_call_s": first,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.steps = 256, 1
    if args.variant:
        print(json.dumps(measure_variant(args.variant, args.device, args.resolution, args.steps, args.quick)))
        return
    from bench.run import _machine

    rows = []
    for name in ["plain", *(v for v in args.variants if v != "plain")]:
        command = [sys.executable, __file__, "--variant", name, "--device", args.device,
                   "--resolution", str(args.resolution), "--steps", str(args.steps)]  # fmt: skip
        command += ["--quick"] if args.quick else []
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"variant {name} failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain = rows[0]["step_s"]
    for row in rows:
        row["speedup_vs_plain"] = plain / row["step_s"]
    unet = "tiny (smoke run)" if args.quick else "SDXL 1.0 base, random weights"
    report = {"machine": _machine(), "command": " ".join(sys.argv), "resolution": args.resolution, "unet": unet,
              "variants": rows}  # fmt: skip
    print(f"one base UNet step at {args.resolution}px, CFG batch 2, {report['machine']['cpu']}, {rows[0]['dtype']}")
    print(f"{'variant':<15} {'step s':>8} {'speedup':>8} {'warm-up s':>10} {'peak RSS GiB':>13}")
    for row in rows:
        print(f"{row['variant']:<15} {row['step_s']:>8.2f} {row['speedup_vs_plain']:>7.2f}x "
              f"{row['first_call_s']:>10.1f} {row['peak_rss_gib']:>13.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
