"""Exact attention kernels on this machine, in bf16, at the self-attention shapes of SDXL at 1024x1024.

    python bench/attention.py --json bench/results/attention-cpu-2core.json

Compares PyTorch's scaled_dot_product_attention (the flash kernel on CPU) with the
exact alternatives a CPU could use: batched matrix multiplies with the softmax in fp32
(one head at a time, to bound memory), and compiled `flex_attention`. Each output is
checked against fp32 attention on the same inputs; "logit spread" scales q and k so
that the attention logits have that standard deviation (trained models reach several).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"64x64 latent tokens, 10 heads": (2, 10, 4096), "32x32 latent tokens, 20 heads": (2, 20, 1024)}


def _matmul_softmax(q: Any, k: Any, v: Any) -> Any:
    """Exact attention from batched matrix multiplies, softmax in fp32, one (batch, head) at a time."""
    import torch

    batch, heads, tokens, dim = q.shape
    q, k, v = (t.reshape(batch * heads, -1, dim) for t in (q, k, v))
    out = torch.empty_like(q)
    for index in range(batch * heads):
        scores = torch.mm(q[index].float() * dim**-0.5, k[index].float().T)
        torch.mm(scores.softmax(-1).to(v.dtype), v[index], out=out[index])
    return out.reshape(batch, heads, tokens, dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="256 tokens: a smoke run")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention

    from bench.run import _machine

    flex = torch.compile(flex_attention)
    kernels = {"sdpa (flash)": F.scaled_dot_product_attention, "matmul + fp32 softmax": _matmul_softmax,
               "flex_attention (compiled)": flex}  # fmt: skip
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        shapes = {"256 tokens, 2 heads (smoke run)": (1, 2, 256)} if args.quick else SHAPES
        for shape_name, (batch, heads, tokens) in shapes.items():
            for spread in (1.0, 3.0):
                q, k = ((torch.randn(batch, heads, tokens, 64) * spread**0.5).bfloat16() for _ in range(2))
                v = torch.randn(batch, heads, tokens, 64).bfloat16()
                reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
                flops = 4 * batch * heads * tokens * tokens * 64
                for kernel_name, kernel in kernels.items():
                    output = kernel(q, k, v)  # warm-up (and compilation)
                    started = time.perf_counter()
                    for _ in range(args.repeats):
                        output = kernel(q, k, v)
                    seconds = (time.perf_counter() - started) / args.repeats
                    error = (output.float() - reference).abs().max().item()
                    rows.append({"shape": shape_name, "logit_spread": spread, "kernel": kernel_name,
                                 "seconds": seconds, "gflops": flops / seconds / 1e9, "max_error": error})  # fmt: skip
                    print(f"{shape_name:<30} spread {spread:.0f}  {kernel_name:<26} {seconds:7.3f} s "
                          f"{flops / seconds / 1e9:6.0f} GFLOP/s  max error {error:.4f}", flush=True)  # fmt: skip
    if args.json:
        report = {"machine": _machine(), "command": " ".join(sys.argv), "dtype": "bfloat16", "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
