"""ControlNet in the engine: the control maps (fitted to the image's size, then preprocessed), the ControlNet
models (loaded from their folders or single files on first use, a few kept), and the arguments diffusers'
ControlNet pipelines take for a request's units.

Control acts on the base's pass that hands over to the refiner; the refiner runs uncontrolled, as in A1111,
ComfyUI's usual graphs and Fooocus: its UNet is another architecture, for which SDXL ControlNets have no
weights, and it only redraws the finest detail of an image whose structure the base already fixed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, MultiControlNetModel
from PIL import Image

from ..control import MODEL_PREPROCESSORS, ControlMode, ControlUnit, Preprocessor
from ..controlnets import ControlSource
from ..errors import InvalidRequest
from .annotators import depth_map
from .controlnet_files import load_single_file
from .image_maps import IMAGE_MAPS
from .image_prep import fit
from .pose import pose_map

LOADED_CONTROLNETS = 2


# "Only masked" inpainting's region: the whole picture's size and the box cut from it (x1, y1, x2, y2).
Region = tuple[tuple[int, int], tuple[int, int, int, int]]


def control_map(unit: ControlUnit, width: int, height: int, annotator: Path | None = None,
                device: str = "cpu", region: Region | None = None) -> Image.Image:  # fmt: skip
    """The unit's image fitted to `width` x `height` (its resize mode), then preprocessed at that size (A1111's
    pixel perfect: the map has exactly the image's pixels); `annotator` is the models' folder a depth or pose
    preprocessor runs (the service's checks found it), run on `device`. With a `region` ("only masked"
    inpainting), the image is fitted to the whole picture, then the box is cut out and stretched to the size,
    as the picture's own box is, so that the map lies where the pixels it guides lie."""
    assert unit.image is not None  # the unit's own rule
    source = unit.image.open().convert("RGB")
    if region is None:
        fitted = fit(source, width, height, unit.resize_mode)
    else:
        (whole_width, whole_height), box = region
        fitted = fit(source, whole_width, whole_height, unit.resize_mode).crop(box)
        fitted = fitted.resize((width, height), Image.Resampling.LANCZOS)
    if unit.preprocessor.value in MODEL_PREPROCESSORS:
        assert annotator is not None, "the service checks a model preprocessor's folder before any work"
        if unit.preprocessor is Preprocessor.OPENPOSE:
            return pose_map(fitted, annotator, device)
        return depth_map(fitted, annotator, device)
    if unit.preprocessor is Preprocessor.NONE:
        return fitted
    return Image.fromarray(IMAGE_MAPS[unit.preprocessor.value](np.asarray(fitted), *unit.sliders()))


def _mode_hook(mode: ControlMode, guided: bool) -> Callable[..., tuple[list[torch.Tensor], torch.Tensor]]:
    """A forward hook giving a ControlNet A1111's control mode `mode` (not Balanced).

    Both modes weaken the residuals from the deepest block (x1) to the shallowest (x0.1), log-spaced: A1111's
    soft injection (0.825 ** (12 - i)), diffusers' guess mode (logspace(-1, 0)). "ControlNet is more
    important" also leaves the unconditional half of a guided batch uncontrolled (A1111's CFG injection,
    diffusers' guess mode), so guidance pushes towards the control; "My prompt is more important" controls
    both halves, so the prompt keeps the upper hand.
    """

    def hook(_module: Any, _inputs: Any, output: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        down, middle = output if isinstance(output, tuple) else (output.down_block_res_samples,
                                                                  output.mid_block_res_sample)  # fmt: skip
        scales = torch.logspace(-1, 0, len(down) + 1, device=middle.device)
        down = [residual * scale for residual, scale in zip(down, scales, strict=False)]
        middle = middle * scales[-1]
        if mode is ControlMode.CONTROLNET and guided:  # diffusers' CFG batch: [unconditional, conditional]
            down = [
                torch.cat([torch.zeros_like(half), kept]) for half, kept in (residual.chunk(2) for residual in down)
            ]
            unconditional, conditional = middle.chunk(2)
            middle = torch.cat([torch.zeros_like(unconditional), conditional])
        return down, middle

    return hook


class ControlNets:
    """ControlNet models by folder, loaded in the engine's dtype on its device; the least recently used goes
    past `LOADED_CONTROLNETS`."""

    def __init__(self, device: str, dtype: Any, base_config: Mapping[str, Any]) -> None:
        self.device, self.dtype, self.base_config = device, dtype, base_config
        self._loaded: OrderedDict[Path, Any] = OrderedDict()
        self._mode_hooks: list[Any] = []  # removed when the pass that set them ends (`for_pass`)
        self._hooked: dict[int, ControlMode] = {}  # models given a mode in this pass (hires fix asks twice)

    @contextlib.contextmanager
    def for_pass(self) -> Iterator[None]:
        """A base pass: the control modes its `arguments` set on the models are taken off when it ends."""
        try:
            yield
        finally:
            while self._mode_hooks:
                self._mode_hooks.pop().remove()
            self._hooked.clear()

    def _set_modes(self, units: tuple[ControlUnit, ...], models: list[Any], guided: bool) -> None:
        """Hooks for the units' control modes (Balanced needs none).

        Raises:
            InvalidRequest: one ControlNet in two units with different modes (the model is shared).
        """
        modes: dict[int, ControlMode] = {}
        for index, (unit, model) in enumerate(zip(units, models, strict=True)):
            if modes.setdefault(id(model), unit.control_mode) is not unit.control_mode:
                raise InvalidRequest(f"controlnets.{index}.control_mode", "one ControlNet in two units needs one "
                                                                          "control mode")  # fmt: skip
        for model in {id(model): model for model in models}.values():
            if modes[id(model)] is not ControlMode.BALANCED and id(model) not in self._hooked:
                self._mode_hooks.append(model.register_forward_hook(_mode_hook(modes[id(model)], guided)))
                self._hooked[id(model)] = modes[id(model)]

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
                  map_key: str, guided: bool, region: Region | None = None) -> tuple[Any, dict[str, Any]]:  # fmt: skip
        """The ControlNet module (one, or diffusers' MultiControlNet for several units) with the units' control
        modes set until the pass ends (`for_pass`), and the pipeline's control arguments; `map_key` is `image`
        (text to image) or `control_image` (image to image, inpainting); `guided`: the batch holds classifier-free
        guidance's unconditional half; `region`: "only masked" inpainting's (`control_map`)."""
        models = [self.get(source.model) for source in sources]
        self._set_modes(units, models, guided)
        maps = [control_map(unit, width, height, source.annotator, self.device, region)
                for unit, source in zip(units, sources, strict=True)]  # fmt: skip
        single = len(units) == 1
        arguments = {
            map_key: maps[0] if single else maps,
            "controlnet_conditioning_scale": units[0].weight if single else [unit.weight for unit in units],
            "control_guidance_start": [unit.guidance_start for unit in units],
            "control_guidance_end": [unit.guidance_end for unit in units],
        }
        return (models[0] if single else MultiControlNetModel(models)), arguments
