"""ControlNet in the engine: the control maps (fitted to the image's size, then preprocessed), the ControlNet
models (loaded from their folders or single files on first use, a few kept), and the arguments diffusers'
ControlNet pipelines take for a request's units.

Control acts on the base's pass that hands over to the refiner; the refiner runs uncontrolled, as in A1111,
ComfyUI's usual graphs and Fooocus: its UNet is another architecture, for which SDXL ControlNets have no
weights, and it only redraws the finest detail of an image whose structure the base already fixed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import ControlNetModel, MultiControlNetModel
from PIL import Image, ImageOps

from ..control import MODEL_PREPROCESSORS, ControlUnit, Preprocessor
from ..controlnets import ControlSource
from .annotators import depth_map
from .controlnet_files import load_single_file
from .image_prep import fit
from .pose import pose_map

LOADED_CONTROLNETS = 2


def control_map(unit: ControlUnit, width: int, height: int, annotator: Path | None = None,
                device: str = "cpu") -> Image.Image:  # fmt: skip
    """The unit's image fitted to `width` x `height` (its resize mode), then preprocessed at that size (A1111's
    pixel perfect: the map has exactly the image's pixels); `annotator` is the models' folder a depth or pose
    preprocessor runs (the service's checks found it), run on `device`."""
    assert unit.image is not None  # the unit's own rule
    fitted = fit(unit.image.open().convert("RGB"), width, height, unit.resize_mode)
    if unit.preprocessor.value in MODEL_PREPROCESSORS:
        assert annotator is not None, "the service checks a model preprocessor's folder before any work"
        if unit.preprocessor is Preprocessor.OPENPOSE:
            return pose_map(fitted, annotator, device)
        return depth_map(fitted, annotator, device)
    if unit.preprocessor is Preprocessor.CANNY:
        import cv2

        edges = cv2.Canny(np.asarray(fitted), unit.threshold_a, unit.threshold_b)
        return Image.fromarray(edges).convert("RGB")
    if unit.preprocessor is Preprocessor.INVERT:
        return ImageOps.invert(fitted)
    return fitted


class ControlNets:
    """ControlNet models by folder, loaded in the engine's dtype on its device; the least recently used goes
    past `LOADED_CONTROLNETS`."""

    def __init__(self, device: str, dtype: Any, base_config: Mapping[str, Any]) -> None:
        self.device, self.dtype, self.base_config = device, dtype, base_config
        self._loaded: OrderedDict[Path, Any] = OrderedDict()

    def get(self, source: Path) -> Any:
        """The ControlNet of a diffusers folder or a single file (whose architecture is read beside the base's
        config), loaded once.

        Raises:
            ModelLoadError: a single file whose tensors do not form an SDXL ControlNet.
        """
        model = self._loaded.pop(source, None)
        if model is None and source.is_file():
            model = load_single_file(source, self.base_config).to(self.device, self.dtype).eval()
        elif model is None:
            variant = "fp16" if (source / "diffusion_pytorch_model.fp16.safetensors").is_file() else None
            model = ControlNetModel.from_pretrained(source, torch_dtype=self.dtype, variant=variant,
                                                    use_safetensors=True, local_files_only=True)  # fmt: skip
            model = model.to(self.device).eval()
        self._loaded[source] = model
        while len(self._loaded) > LOADED_CONTROLNETS:
            self._loaded.popitem(last=False)
        return model

    def arguments(self, units: tuple[ControlUnit, ...], sources: list[ControlSource], width: int, height: int,
                  map_key: str) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """The ControlNet module (one, or diffusers' MultiControlNet for several units) and the pipeline's
        control arguments; `map_key` is `image` (text to image) or `control_image` (image to image, inpainting)."""
        models = [self.get(source.model) for source in sources]
        maps = [control_map(unit, width, height, source.annotator, self.device)
                for unit, source in zip(units, sources, strict=True)]  # fmt: skip
        single = len(units) == 1
        arguments = {
            map_key: maps[0] if single else maps,
            "controlnet_conditioning_scale": units[0].weight if single else [unit.weight for unit in units],
            "control_guidance_start": [unit.guidance_start for unit in units],
            "control_guidance_end": [unit.guidance_end for unit in units],
        }
        return (models[0] if single else MultiControlNetModel(models)), arguments
