"""The upscaler folder and the models loaded from it: enlarge an image with a model or a plain resampler.

Used for A1111's extras (upscale jobs) and by hires fix's pixel pass. A model runs as many times as needed to
reach the size asked for (at most three, as A1111 does), then Lanczos brings it to the exact size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import InvalidRequest
from ..results import CancelToken
from .device import choose_device
from .upscaler_models import (
    SUFFIXES,
    UnusableUpscaler,
    UpscalerInfo,
    describe,
    load_upscaler,
    tile_count,
    upscale_tiled,
)

RESAMPLERS = {"None": Image.Resampling.LANCZOS, "Lanczos": Image.Resampling.LANCZOS,
              "Nearest": Image.Resampling.NEAREST}  # fmt: skip
MAX_MODEL_PASSES = 3
LOADED_MODELS = 2  # upscaler models kept loaded (a few tens of MB each)


@dataclass(frozen=True)
class UpscalerEntry:
    """One file of the upscaler folder: its name (its path in the folder without the suffix), and what it is,
    or why it cannot be used."""

    name: str
    path: Path
    info: UpscalerInfo | None
    reason: str | None = None


class Upscalers:
    """The upscaler folder (`REFINERY_UPSCALER_DIR`) on one device.

    Thread-safe: listings come from the server's threads, runs from the service's engine thread.
    """

    def __init__(self, folder: Path | None, device: str = "auto") -> None:
        self.folder = folder
        self.device = torch.device(choose_device(device))
        self._loaded: OrderedDict[Path, Any] = OrderedDict()
        self._lock = threading.Lock()

    # -- the folder --------------------------------------------------------------------------------------
    def entries(self) -> list[UpscalerEntry]:
        """Every upscaler file, sorted by name; an unusable one carries its reason (read once per file version)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in SUFFIXES:
                continue
            name = path.relative_to(self.folder).with_suffix("").as_posix()
            try:
                found.append(UpscalerEntry(name, path, describe(path)))
            except UnusableUpscaler as error:
                found.append(UpscalerEntry(name, path, None, str(error)))
            except OSError as error:  # gone or unreadable between listing and reading
                found.append(UpscalerEntry(name, path, None, f"unreadable ({error.strerror or error})"))
        return found

    def check(self, name: str, field: str) -> UpscalerEntry | None:
        """The usable model file `name` names (None for a resampler).

        Raises:
            InvalidRequest: naming `field`: an unknown name, or a file that cannot be used and why.
        """
        if name in RESAMPLERS:
            return None
        entries = self.entries()
        entry = next((entry for entry in entries if entry.name == name), None)
        if entry is None:
            usable = [entry.name for entry in entries if entry.info is not None]
            known = ", ".join([*RESAMPLERS, *usable][:30])
            raise InvalidRequest(field, f"no upscaler {name!r}; known: {known} (GET /sdapi/v1/upscalers)")
        if entry.info is None:
            raise InvalidRequest(field, f"upscaler {name!r} cannot be used: {entry.reason}")
        return entry

    def _model(self, name: str) -> Any:
        entry = self.check(name, "upscaler")
        assert entry is not None  # a model's name: resamplers never get here
        with self._lock:
            model = self._loaded.pop(entry.path, None)
            if model is None:
                model = self._load(name, entry.path)
            self._loaded[entry.path] = model
            while len(self._loaded) > LOADED_MODELS:
                self._loaded.popitem(last=False)
            return model

    def _load(self, name: str, path: Path) -> Any:
        """The model on this device.

        Raises:
            InvalidRequest: the file was replaced by one that cannot be used since it was listed.
        """
        try:
            return load_upscaler(path).to(self.device)
        except UnusableUpscaler as error:
            raise InvalidRequest("upscaler", f"upscaler {name!r} cannot be used: {error}") from None

    # -- running -----------------------------------------------------------------------------------------
    def _dtype(self, model: Any) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" and model.supports_half else torch.float32

    def tiles(self, name: str, width: int, height: int, target: tuple[int, int]) -> int:
        """How many tiles enlarging a `width` x `height` image to `target` runs (0 for a resampler)."""
        if name in RESAMPLERS:
            return 0
        entry = self.check(name, "upscaler")
        assert entry is not None and entry.info is not None
        scale, total = entry.info.scale, 0
        for _ in range(MAX_MODEL_PASSES):
            if width >= target[0] and height >= target[1]:
                break
            total += tile_count(width, height)
            width, height = width * scale, height * scale
        return total

    def enlarge(
        self,
        image: Image.Image,
        name: str,
        target: tuple[int, int],
        on_tile: Callable[[], None] | None = None,
        cancel: CancelToken | None = None,
    ) -> Image.Image:
        """`image` brought to `target` (width, height) by upscaler `name`: a resampler, or a model run until the
        image covers the target (at most 3 times), then Lanczos to the exact size.

        Raises:
            InvalidRequest: an unknown or unusable upscaler (field `upscaler`).
            Cancelled: the token was cancelled between tiles.
        """
        image = image.convert("RGB")
        if name not in RESAMPLERS:
            model = self._model(name)
            dtype = self._dtype(model)
            for _ in range(MAX_MODEL_PASSES):
                if image.width >= target[0] and image.height >= target[1]:
                    break
                image = upscale_tiled(model, image, self.device, dtype, lambda _done, _all: on_tile and on_tile(),
                                      cancel)  # fmt: skip
        if image.size == target:
            return image
        return image.resize(target, RESAMPLERS.get(name, Image.Resampling.LANCZOS))
