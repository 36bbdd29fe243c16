"""What a LoRA costs per step: the full-size SDXL base UNet plain, with a LoRA fused the engine's way, and
with the LoRA left as PEFT's extra layers, all in the same run.

    python bench/loras.py --device cpu --resolution 512 --json bench/results/loras-cpu-2core.json
    python bench/loras.py --quick      # the tiny UNet: a smoke run

The LoRA is random (timings do not depend on weight values), rank `--rank` on what Kohya's SDXL trainer
targets in every transformer block (q, k, v, out, the feed-forward and the block's in/out projections),
saved as a file and applied through the engine's own `LoraWeights` (engine/lora_weights.py). Per variant:
seconds per UNet call on the CFG batch of two (median after a warm-up; plain and fused measured in turn,
`--rounds` times each), the time to load the file, to fuse and to put the weights back; and whether the
weights came back bit for bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def _write_lora(unet: Any, rank: int, path: Path) -> int:
    """A random rank-`rank` LoRA of every targeted Linear of `unet`, in the diffusers layout; its parameters."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS) and "attentions" in name:
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.01
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.01
    save_file(tensors, path)
    return sum(tensor.numel() for tensor in tensors.values())


def _step(unet: Any, latent: int, device: str, dtype: Any) -> Any:
    import torch

    sample = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
             "time_ids": torch.randn(2, 6, device=device, dtype=dtype)}  # fmt: skip
    timestep = torch.tensor(500, device=device)

    def call() -> None:
        with torch.no_grad():
            unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)

    return call


def _timed(call: Any, repeats: int) -> tuple[float, float]:
    """Median seconds of `repeats` calls after one warm-up call, and the warm-up's."""
    import torch

    def once() -> float:
        started = time.perf_counter()
        call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started

    first = once()
    return statistics.median(once() for _ in range(repeats)), first


def _fingerprint(unet: Any) -> list[tuple[Any, int]]:
    """Every weight with its storage address: the same storage after the run (never written in place) means
    the very tensors were put back, not rebuilt by subtraction."""
    return [(parameter, parameter.data_ptr()) for parameter in unet.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed UNet calls per variant, after a warm-up")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="plain and fused measured in turn this many times")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.resolution, args.steps, args.rank, args.rounds = 256, 1, 4, 1

    import torch

    from bench.run import _components, _machine
    from sdxl_refinery.engine.device import choose_placement
    from sdxl_refinery.engine.lora_weights import LoraWeights
    from sdxl_refinery.loras import check_file

    placement = choose_placement(args.device, "auto")
    unet = _components("sdxl-base", args.quick, placement.dtype, placement.device)["unet"]
    call = _step(unet, args.resolution // 8, placement.device, placement.dtype)
    path = Path(tempfile.mkdtemp()) / "bench.safetensors"
    lora_parameters = _write_lora(unet, args.rank, path)
    lora = check_file("bench", path, context_width=None)
    weights = LoraWeights(SimpleNamespace(unet=unet, text_encoder=torch.nn.Module(), text_encoder_2=torch.nn.Module()))
    rows: dict[str, Any] = {}

    # 1. Loading (once per file; cached after).
    before = _fingerprint(unet)
    started = time.perf_counter()
    weights.load(lora)  # type: ignore[arg-type]
    load_s = time.perf_counter() - started
    # 2. Plain and fused in turn, `--rounds` times (a shared machine drifts by several per cent over minutes:
    #    the same number of each, interleaved, so drift falls on both sides), each fuse and restore timed.
    times: dict[str, list[float]] = {"plain": [], "fused": []}
    fuse_s, restore_s = [], []
    for _ in range(args.rounds):
        times["plain"].append(_timed(call, args.steps)[0])
        started = time.perf_counter()
        with weights.applied([(lora, 0.8)]):
            fuse_s.append(time.perf_counter() - started)
            times["fused"].append(_timed(call, args.steps)[0])
            started = time.perf_counter()
        restore_s.append(time.perf_counter() - started)
    restored = all(parameter.data_ptr() == address for parameter, address in before)
    # 3. The LoRA as PEFT's extra layers (what diffusers' set_adapters alone leaves), for comparison.
    LoraWeights._activate(unet, {f"lora_{lora.short_hash}": 0.8})
    times["unfused (PEFT layers)"] = [_timed(call, args.steps)[0]]
    weights._switch_off()
    rows = {name: statistics.mean(values) for name, values in times.items()}
    baseline = rows["plain"]
    report = {"machine": _machine(), "device": placement.device, "dtype": str(placement.dtype).removeprefix("torch."),
              "resolution": args.resolution, "rank": args.rank, "quick": args.quick,
              "lora_parameters_million": round(lora_parameters / 1e6, 2), "load_s": round(load_s, 3),
              "fuse_s": round(statistics.median(fuse_s), 3), "restore_s": round(statistics.median(restore_s), 4),
              "weights_restored_exactly": restored, "rounds": args.rounds,
              "rows": [{"variant": name, "step_s": round(seconds, 3), "vs_plain": round(seconds / baseline, 3),
                        "each_round_s": [round(value, 3) for value in times[name]]}
                       for name, seconds in rows.items()]}  # fmt: skip
    for row in report["rows"]:
        print(f"{row['variant']:>22}: {row['step_s']:.3f} s per UNet call (CFG batch 2), {row['vs_plain']}x plain")
    print(
        f"load {load_s:.2f} s, fuse {report['fuse_s']:.2f} s, restore {report['restore_s'] * 1000:.1f} ms, "
        f"weights restored exactly: {restored}; LoRA {lora_parameters / 1e6:.1f} M parameters, rank {args.rank}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
