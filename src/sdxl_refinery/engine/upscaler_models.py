"""Upscaler model files (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, OmniSR and the rest of spandrel's families):
reading them safely, and running them tile by tile.

spandrel detects the architecture from the weights. Files are read here, not by spandrel's own loader: a
`.safetensors` file holds only tensors, and a `.pth`/`.pt` file is opened with `torch.load(weights_only=True)`,
whose unpickler builds tensors and containers only, so no pickled code runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import Cancelled
from ..results import CancelToken
from .meta_race import built_off_meta

SUFFIXES = (".safetensors", ".pth", ".pt")
TILE = 512  # input pixels per tile side, context margins included
MARGIN = 32  # input pixels of context around each tile's core, run through the model and then discarded


class UnusableUpscaler(Exception):
    """A file in the upscaler folder that cannot be used, and why (`str(error)`)."""


@dataclass(frozen=True)
class UpscalerInfo:
    """What an upscaler file is, read from its weights: the architecture's name and the factor it enlarges by."""

    architecture: str
    scale: int


def _unavailable(name: str) -> Any:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision.{name} is needed and torchvision is not installed")

    return refuse


@contextlib.contextmanager
def _torchvision_for_import() -> Iterator[None]:
    """spandrel imports two names from torchvision at import time, for two architectures that are not upscalers
    (LaMa inpainting, RestoreFormer face restoration). PyPI has no torchvision for PyTorch's CPU builds (its
    wheels need CUDA's libraries), so where torchvision does not import, those names are, for the length of
    spandrel's import, functions that raise if called, and are removed from `sys.modules` afterwards so that no
    other library takes torchvision for installed. Both architectures are refused anyway: they do not upscale."""
    try:
        importlib.import_module("torchvision.transforms.functional")
        installed = True
    except (ImportError, RuntimeError, OSError):  # absent, or a CUDA wheel beside a CPU build of torch
        installed = False
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]
    if installed:
        yield
        return
    stand_ins = {name: types.ModuleType(name) for name in
                 ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")}  # fmt: skip
    functional = stand_ins["torchvision.transforms.functional"]
    for name in ("InterpolationMode", "rotate", "normalize"):
        setattr(functional, name, _unavailable(f"transforms.functional.{name}"))
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


@functools.cache
def _spandrel() -> Any:
    with _torchvision_for_import():
        import spandrel
    return spandrel


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file, without running any code it holds.

    Raises:
        UnusableUpscaler: another format, unreadable, or a pickle that asks for more than tensors.
    """
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UnusableUpscaler(f"not an upscaler file ({', '.join(SUFFIXES)} are read)")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure to read the file makes it unusable, with its reason
        reason = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        raise UnusableUpscaler(f"not readable as weights only ({reason})") from None
    if not isinstance(loaded, dict):
        raise UnusableUpscaler(f"holds a {type(loaded).__name__}, not a mapping of tensors")
    return loaded


def load_upscaler(path: Path) -> Any:
    """spandrel's model descriptor of an upscaler file, on the CPU, in eval mode.

    Raises:
        UnusableUpscaler: unreadable, an architecture spandrel does not know, or a model that does not upscale.
    """
    state_dict = read_state_dict(path)
    try:
        spandrel = _spandrel()
    except ImportError:
        raise UnusableUpscaler("spandrel is not installed (pip install 'sdxl-refinery[upscalers]')") from None
    model = _built(spandrel, state_dict)
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose != "SR" or model.scale < 2:
        what = getattr(model, "purpose", type(model).__name__)
        raise UnusableUpscaler(f"a {model.architecture.name} model for {what}, not an upscaler")
    if model.input_channels != 3 or model.output_channels != 3:
        raise UnusableUpscaler(f"a {model.architecture.name} model for {model.input_channels}-channel images")
    return model.eval()


def _built(spandrel: Any, state_dict: dict[str, torch.Tensor]) -> Any:
    """spandrel's model of `state_dict`, with real weights (built again while other threads' loads leave it
    meta tensors: `meta_race`).

    Raises:
        UnusableUpscaler: an architecture spandrel does not know, or weights that fit none.
    """

    def build() -> Any:
        try:
            return spandrel.ModelLoader(device="cpu").load_from_state_dict(state_dict)
        except spandrel.UnsupportedModelError:
            raise UnusableUpscaler("not a model architecture spandrel knows") from None

    try:
        return built_off_meta(build, lambda model: [model.model], lambda reason: UnusableUpscaler(
            f"could not be built ({reason})"))  # fmt: skip
    except UnusableUpscaler:
        raise
    except Exception as error:  # noqa: BLE001 - a known architecture whose weights do not fit it
        raise UnusableUpscaler(f"weights that fit no architecture ({str(error)[:300]})") from None


def describe(path: Path) -> UpscalerInfo:
    """The architecture and factor of an upscaler file, read once per version of the file.

    Raises:
        UnusableUpscaler: as `load_upscaler`.
    """
    status = path.stat()
    return _described(path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _described(path: Path, size: int, modified_ns: int) -> UpscalerInfo:
    model = load_upscaler(path)
    return UpscalerInfo(model.architecture.name, int(model.scale))


def _starts(length: int, core: int) -> list[int]:
    """Where each tile's core starts along one side: every `core` pixels, the last one flush with the end."""
    if length <= core:
        return [0]
    starts = list(range(0, length - core, core))
    return [*starts, length - core]


def tile_count(width: int, height: int, tile: int = TILE, margin: int = MARGIN) -> int:
    """How many tiles an image of this size is run in."""
    core = tile - 2 * margin
    return len(_starts(width, core)) * len(_starts(height, core))


def upscale_tiled(
    model: Any,
    image: Image.Image,
    device: torch.device,
    dtype: torch.dtype,
    on_tile: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
    tile: int = TILE,
    margin: int = MARGIN,
) -> Image.Image:
    """`image` enlarged by the model's factor, in tiles so that memory is bounded by the tile, not the image.

    Each tile is a core of `tile - 2 * margin` pixels run with `margin` pixels of the image around it (less at
    the image's edges); only the core's output is kept, so the seams see the same neighbourhood as a whole-image
    run and no blending is needed. The output is built in 8-bit memory, 3 bytes per output pixel.

    Args:
        on_tile: called with (tiles done, tiles in all) after each tile.
        cancel: checked before each tile.

    Raises:
        Cancelled: the token was cancelled.
    """
    scale = int(model.scale)
    rgb = np.array(image.convert("RGB"))  # a copy: torch wants writable memory
    height, width = rgb.shape[:2]
    source = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    out = np.empty((height * scale, width * scale, 3), dtype=np.uint8)
    core = tile - 2 * margin
    places = [(top, left) for top in _starts(height, core) for left in _starts(width, core)]
    for done, (top, left) in enumerate(places, start=1):
        if cancel is not None and cancel.cancelled:
            raise Cancelled("cancelled by request")
        bottom, right = min(top + core, height), min(left + core, width)
        y0, x0 = max(top - margin, 0), max(left - margin, 0)
        y1, x1 = min(bottom + margin, height), min(right + margin, width)
        window = source[:, :, y0:y1, x0:x1].to(device=device, dtype=dtype) / 255.0
        with torch.inference_mode():
            result = model(window)
        kept = result[0, :, (top - y0) * scale : (bottom - y0) * scale, (left - x0) * scale : (right - x0) * scale]
        pixels = (kept.float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        out[top * scale : bottom * scale, left * scale : right * scale] = pixels
        if on_tile is not None:
            on_tile(done, len(places))
    return Image.fromarray(out)
