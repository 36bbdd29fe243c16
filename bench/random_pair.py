"""Write a full-size SDXL base + refiner pair with random weights as diffusers folders, for benchmarks that
need real model references (a `refinery serve` under load) where no weights can be downloaded.

    python bench/random_pair.py --out /tmp/sdxl-random --dtype fp16    # about 12 GB on disk
    REFINERY_BASE_MODEL=/tmp/sdxl-random/base REFINERY_REFINER_MODEL=/tmp/sdxl-random/refiner refinery serve

Timings do not depend on weight values. Configs and tokenizer files are SDXL 1.0's, shipped in the package;
each component is built alone (in the target dtype) and saved before the next, so peak memory is the
largest component (the base UNet: 5.1 GB in fp16). The refiner folder gets its own copy of text encoder 2
and the VAE: the engine keeps one when they are equal, as they are in SDXL 1.0 (not here: random).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def write_pair(out: Path, dtype_name: str, only: list[str] | None = None) -> dict[str, float]:
    """Both folders under `out` (`base`, `refiner`); returns seconds per component written.

    Args:
        only: components to write (default all); configs are always written.
    """
    import torch

    from bench.run import _one_component
    from sdxl_refinery.engine.single_file import materialize_config, shipped_config

    dtype = getattr(torch, DTYPES[dtype_name])
    seconds: dict[str, float] = {}
    for kind, folder in (("sdxl-base", out / "base"), ("sdxl-refiner", out / "refiner")):
        config = shipped_config(kind)
        materialize_config(config, folder)
        for name in COMPONENTS:
            if name not in config or (only and name not in only):
                continue
            started = time.perf_counter()
            part = _one_component(kind, name, dtype)
            part.save_pretrained(folder / name, safe_serialization=True)
            del part
            gc.collect()
            seconds[f"{kind}/{name}"] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--only", nargs="+", choices=COMPONENTS, help="write only these components")
    args = parser.parse_args()
    for part, spent in write_pair(args.out, args.dtype, args.only).items():
        print(f"{part}: {spent:.1f} s")


if __name__ == "__main__":
    main()
