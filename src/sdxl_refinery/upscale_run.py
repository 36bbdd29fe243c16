"""Running an upscale request on the service's engine thread: each image enlarged, blended with a second
upscaler when asked, progress reported per tile, PNGs written atomically.

PNG text: an image that carried A1111 `parameters` keeps them, with A1111's `Postprocess upscale by` and
`Postprocess upscaler` appended to its settings line, as A1111's extras tab writes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from .png import PARAMETERS_KEY, numbered_paths, write_png
from .results import CancelToken, Progress, ProgressCallback
from .upscale_request import UpscaleRequest

if TYPE_CHECKING:
    from .engine.upscaling import Upscalers

log = logging.getLogger("refinery")
UPSCALE_STAGE = 3  # progress stage of an upscale job (1 and 2 are the base and the refiner)


@dataclass
class UpscaleResult:
    """What an upscale produced: one image per image given.

    Attributes:
        upscalers: each model used: name, architecture and factor (resamplers have no entry).
    """

    images: list[Image.Image]
    request: UpscaleRequest
    device: str
    timings: dict[str, float]
    upscalers: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # none: an upscale draws no noise (a job result's shape)

    def metadata(self) -> dict[str, Any]:
        """Everything but the pixels, as plain JSON-able data."""
        return {"kind": "upscale", "request": self.request.recorded(), "device": self.device, "seeds": [],
                "timings": {k: round(v, 4) for k, v in self.timings.items()},
                "upscalers": [dict(entry) for entry in self.upscalers]}  # fmt: skip


def postprocess_text(request: UpscaleRequest, source: Image.Image, target: tuple[int, int]) -> str:
    """The settings A1111 appends to an image's parameters after an extras upscale."""
    if request.width and request.height:
        scaled = f"Postprocess upscale to: {target[0]}x{target[1]}"
    else:
        scaled = f"Postprocess upscale by: {request.scale:g}"
    parts = [scaled, f"Postprocess upscaler: {request.upscaler}"]
    if request.upscaler_2 and request.upscaler_2_visibility > 0:
        parts += [f"Postprocess upscaler 2: {request.upscaler_2}",
                  f"Postprocess upscaler 2 visibility: {request.upscaler_2_visibility:g}"]  # fmt: skip
    own = str(source.info.get(PARAMETERS_KEY) or "").rstrip()
    return f"{own}, {', '.join(parts)}" if own else ", ".join(parts)


def _cropped_to(image: Image.Image, target: tuple[int, int]) -> tuple[Image.Image, tuple[int, int]]:
    """For a size with another aspect ratio: the centred part of `image` with the target's ratio, and the size
    to enlarge it to (A1111's upscaling_crop)."""
    ratio = target[0] / target[1]
    width, height = image.size
    if abs(width / height - ratio) < 1e-6:
        return image, target
    crop_w, crop_h = (round(height * ratio), height) if width / height > ratio else (width, round(width / ratio))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return image.crop((left, top, left + crop_w, top + crop_h)), target


def run_upscale(
    upscalers: Upscalers,
    request: UpscaleRequest,
    output_path: str | Path | None,
    on_progress: ProgressCallback | None,
    cancel: CancelToken,
) -> UpscaleResult:
    """Enlarge every image of `request`; write PNGs when `output_path` is given.

    Raises:
        InvalidRequest: an upscaler is unknown or unusable, or an image was given only by its hash.
        Cancelled: the token was cancelled between tiles or before the files were written.
        StorageError: a PNG could not be written (nothing partial is left).
    """
    started = time.perf_counter()
    sources = [image.open() for image in request.images if image is not None]
    plans = []  # 1. what each image becomes, and the tiles that takes (the progress total)
    for source in sources:
        fitted, target = source, request.size_for(*source.size)
        if request.width and request.height and request.crop:
            fitted, target = _cropped_to(source, target)
        plans.append((fitted, target))
    names = request.upscaler_names
    total = max(1, sum(upscalers.tiles(name, *fitted.size, target) for fitted, target in plans for name in names))
    done = 0

    def tile_done() -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            elapsed = time.perf_counter() - started
            on_progress(Progress(UPSCALE_STAGE, done, total, elapsed, elapsed / done * (total - done)))

    images = []  # 2. enlarge, blending the second upscaler in
    for source, (fitted, target) in zip(sources, plans, strict=True):
        image = upscalers.enlarge(fitted, request.upscaler, target, tile_done, cancel)
        if len(names) == 2:
            second = upscalers.enlarge(fitted, names[1], target, tile_done, cancel)
            image = Image.blend(image, second, request.upscaler_2_visibility)
        image.info[PARAMETERS_KEY] = postprocess_text(request, source, target)
        images.append(image)
    if on_progress is not None and done < total:  # resamplers only: one report, at the end
        elapsed = time.perf_counter() - started
        on_progress(Progress(UPSCALE_STAGE, total, total, elapsed, 0.0))
    used = {entry.name: entry for entry in upscalers.entries() if entry.name in names and entry.info is not None}
    result = UpscaleResult(images, request, str(upscalers.device), {"upscale": time.perf_counter() - started},
                           [{"name": name, "architecture": entry.info.architecture, "scale": entry.info.scale}
                            for name, entry in used.items() if entry.info is not None])  # fmt: skip
    if output_path is not None:  # 3. the files, each written atomically
        cancel.raise_if_cancelled()
        metadata = result.metadata()
        for index, (image, path) in enumerate(zip(images, numbered_paths(Path(output_path), request.n), strict=True)):
            write_png(image, path, metadata, index, parameters=image.info[PARAMETERS_KEY])
            result.paths.append(str(path))
            log.info("Upscaled image saved to %s", path)
    result.timings["total"] = time.perf_counter() - started
    return result
