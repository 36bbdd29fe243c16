"""Depth preprocessors: a transformers depth-estimation model from the annotator folder turns an image into
the depth map SDXL depth ControlNets were trained on.

The map is the model's prediction at the image's own size (the image processor's own post-processing),
scaled so its nearest point is white and its farthest black, as A1111's ControlNet extension writes MiDaS
maps; models that predict distance (ZoeDepth, GLPN, Depth Pro, metric Depth Anything) are inverted first.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..annotators import is_metric
from ..errors import ModelLoadError
from .meta_race import built_off_meta

LOADED_ESTIMATORS = 2
_loading = threading.Lock()


@functools.lru_cache(maxsize=LOADED_ESTIMATORS)
def _estimator(folder: Path, device: str) -> tuple[Any, Any]:
    """The image processor and model of a depth-estimation folder, loaded once (fp32, eval).

    Raises:
        ModelLoadError: the model kept meta tensors however often it was built (other threads' loads).
    """
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    model = built_off_meta(
        lambda: AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True),
        lambda built: [built],
        lambda reason: ModelLoadError(f"depth model {folder} could not be built ({reason})"),
    )
    return processor, model.to(device).eval()


def depth_map(image: Image.Image, folder: Path, device: str = "cpu") -> Image.Image:
    """The depth map of `image` (its size, RGB, near = white) by the model in `folder`."""
    with _loading:  # one load per folder even when a preview and a run ask at once
        processor, model = _estimator(folder, device)
    inputs = processor(images=image, return_tensors="pt").to(device)
    with torch.inference_mode():
        outputs = model(**inputs)
    size = [(image.height, image.width)]
    depth = processor.post_process_depth_estimation(outputs, target_sizes=size)[0]["predicted_depth"]
    depth = depth.float().cpu().numpy()
    if is_metric(model.config.to_dict()):
        depth = -depth
    span = float(depth.max() - depth.min())
    scaled = (depth - depth.min()) / span if span > 0 else np.zeros_like(depth)
    gray = (scaled * 255.0).clip(0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
