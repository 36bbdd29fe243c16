"""What keeping the IP-Adapter image encoder saves: loading SDXL IP-Adapter's full-size image encoder (CLIP
ViT-H/14 with projection, h94's `sdxl_models/image_encoder` config, random weights) against encoding one
reference image with it, in the same run. A run with image prompts used to pay the load every time; now the
first run does.

    python bench/image_prompt_encoder.py --repeats 3 --json bench/results/image-prompt-encoder-cpu-2core.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name, report

# h94/IP-Adapter sdxl_models/image_encoder/config.json (ViT-H/14), the encoder of ip-adapter_sdxl_vit-h and
# ip-adapter-plus_sdxl_vit-h.
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu"}  # fmt: skip


def main() -> None:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).save_pretrained(folder)
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        pixels = processor(images=Image.new("RGB", (512, 512), (120, 90, 60)), return_tensors="pt").pixel_values
        seconds: dict[str, list[float]] = {"load": [], "encode": []}
        model: Any = None
        for _ in range(args.repeats):  # interleaved; the file is in the page cache after the first save
            started = time.perf_counter()
            model = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=torch.float32).eval()
            seconds["load"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with torch.inference_mode():
                model(pixel_values=pixels)
            seconds["encode"].append(time.perf_counter() - started)
        result: dict[str, Any] = {
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": "fp32",
            "encoder_parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6),
            "repeats": args.repeats, "load_seconds": round(statistics.median(seconds["load"]), 2),
            "encode_seconds": round(statistics.median(seconds["encode"]), 3),
        }  # fmt: skip
    result["load_over_encode"] = round(result["load_seconds"] / result["encode_seconds"], 1)
    report(result, args.json)


if __name__ == "__main__":
    main()
