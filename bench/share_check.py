"""What checking a refiner's own text encoder 2 and VAE against the base's costs at load (engine/loader.py
`share_identical`): the full-size SDXL OpenCLIP-G text encoder and VAE, random weights, compared tensor by
tensor with an identical copy (the worst case: every value is read; SDXL 1.0's refiner is this case) and with a
copy that differs in its first tensor (a fine-tuned refiner: the check stops there).

    python bench/share_check.py --dtype bf16 --json bench/results/share-check-cpu-2core.json
    python bench/share_check.py --quick      # the tiny pair's modules: a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _modules(quick: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if quick:
        import tempfile

        from sdxl_refinery.engine.tiny import build_tiny_pair

        with tempfile.TemporaryDirectory() as scratch:
            base, _ = build_tiny_pair(Path(scratch))
        return {"text_encoder_2": base.text_encoder_2, "vae": base.vae}
    from sdxl_refinery.engine.single_file import shipped_config

    config = shipped_config("sdxl-base")
    encoder = CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"]))
    vae = AutoencoderKL.from_config(config["vae"])
    return {"text_encoder_2": encoder, "vae": vae}


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _timed(function: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    from sdxl_refinery.engine.loader import same_tensors

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for name, module in _modules(args.quick).items():
        module = module.to(dtype)
        twin = copy.deepcopy(module)
        changed = copy.deepcopy(module)
        first = next(iter(changed.state_dict().values()))
        first.add_(1)  # a fine-tune's weights differ: the check stops at the first tensor
        parameters = sum(tensor.numel() for tensor in module.state_dict().values())
        same_seconds, same = _timed(lambda m=module, t=twin: same_tensors(m, t))
        differ_seconds, differ = _timed(lambda m=module, c=changed: same_tensors(m, c))
        assert same and not differ
        timings = {"identical_seconds": round(same_seconds, 4), "different_seconds": round(differ_seconds, 4)}
        rows.append({"module": name, "parameters": parameters, "bytes": parameters * dtype.itemsize, **timings})
        print(f"{name:15s} {parameters / 1e6:8.1f} M params  identical: {same_seconds:6.3f} s   "
              f"different: {differ_seconds:6.4f} s")  # fmt: skip
    report = {"machine": _cpu_name(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "dtype": args.dtype, "quick": args.quick, "rows": rows}  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
