"""Upscaler files built at test time: tiny ESRGANs spandrel detects, and files that must be refused."""

from __future__ import annotations

import pathlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sdxl_refinery.engine.upscaler_models import _spandrel


def tiny_esrgan(scale: int = 4, seed: int = 0) -> Any:
    """spandrel's ESRGAN (RRDBNet) with 8 filters and one block: its weights, random from `seed`."""
    esrgan = _spandrel().architectures.ESRGAN.ESRGAN
    torch.manual_seed(seed)
    return esrgan(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=scale).eval()


def write_tiny_esrgan(path: Path, scale: int = 4, seed: int = 0) -> Path:
    """A tiny ESRGAN saved as `.safetensors` or `.pth` (a plain state dict), by `path`'s suffix."""
    state = {key: value.contiguous() for key, value in tiny_esrgan(scale, seed).state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


class _Touches:
    """Unpickling this calls `pathlib.Path.touch(marker)`: code a hostile checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def write_hostile_pth(path: Path, marker: Path) -> Path:
    """A `.pth` whose state dict holds an object that, unpickled, creates `marker`."""
    state = {key: value for key, value in tiny_esrgan().state_dict().items()}
    torch.save({**state, "payload": _Touches(marker)}, path)
    return path
