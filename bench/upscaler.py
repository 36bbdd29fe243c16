"""Upscaler models measured: a full-size ESRGAN (RRDBNet, 64 filters, 23 blocks, 4x; random weights, as
spandrel builds it from a Real-ESRGAN-shaped state dict) run on one image whole, by hand, and by Refinery's
tiles (context margins cut away), in the same run: seconds, output memory, and the largest pixel difference.

    python bench/upscaler.py --size 192 --tile 128 --margin 16 --json bench/results/upscaler-cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdxl_refinery.engine.upscaler_models import _spandrel, tile_count, upscale_tiled

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192, help="input image side in pixels")
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--margin", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spandrel = _spandrel()
    torch.manual_seed(0)
    network = spandrel.architectures.ESRGAN.ESRGAN(num_filters=64, num_blocks=23, scale=4)
    model = spandrel.ModelLoader().load_from_state_dict(network.state_dict()).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    # 1. Whole, by hand (the baseline): one forward over the image, float output.
    started = time.perf_counter()
    with torch.inference_mode():
        whole = model(torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255)
    whole_s = time.perf_counter() - started
    expected = (whole[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)
    # 2. Tiled, as Refinery runs it.
    started = time.perf_counter()
    tiled = upscale_tiled(model, image, torch.device("cpu"), torch.float32, tile=args.tile, margin=args.margin)
    tiled_s = time.perf_counter() - started
    result = {
        "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "input": args.size,
        "output": tiled.size[0], "tile": args.tile, "margin": args.margin,
        "tiles": tile_count(args.size, args.size, args.tile, args.margin),
        "whole_seconds": round(whole_s, 2), "tiled_seconds": round(tiled_s, 2),
        "tiled_over_whole": round(tiled_s / whole_s, 3),
        "max_difference_levels": int(np.abs(np.asarray(tiled).astype(np.int16) - expected).max()),
        "whole_output_float_mb": round(whole.numel() * 4 / 2**20, 1),
        "tiled_output_uint8_mb": round(tiled.size[0] * tiled.size[1] * 3 / 2**20, 1),
    }  # fmt: skip
    report(result, args.json)


if __name__ == "__main__":
    main()
