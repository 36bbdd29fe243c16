"""The preprocessors that are pure image processing, as A1111's ControlNet extension computes them (its
`canny`, `invert`, `threshold`, `scribble_xdog`, `lineart_standard`, `t2ia_color_grid`, `tile_resample`,
`blur_gaussian`, `recolor_luminance`, `recolor_intensity`), always at the image's own size (its pixel perfect).

Each takes an RGB array and the unit's sliders (defaults already filled in) and gives the map as RGB.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

Map = np.ndarray


def _gray_to_rgb(gray: Map) -> Map:
    return np.repeat(gray[..., None], 3, axis=-1)


def canny(image: Map, low: float, high: float) -> Map:
    """OpenCV's Canny edges, white on black."""
    return _gray_to_rgb(cv2.Canny(image, int(low), int(high)))


def invert(image: Map, _a: float, _b: float) -> Map:
    """Black lines on white made white on black (a sketch for line models)."""
    return 255 - image


def threshold(image: Map, level: float, _b: float) -> Map:
    """White where every channel is above `level`, black elsewhere."""
    return _gray_to_rgb(np.where(image.min(axis=2) > level, 255, 0).astype(np.uint8))


def scribble_xdog(image: Map, level: float, _b: float) -> Map:
    """A scribble from the difference of two Gaussians (sigma 0.5 and 5), white where it passes `level`."""
    fine = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    # A1111 (and ControlNet's own code) doubles in uint8, so it wraps past 255; the maps models saw did too.
    doubled = (2 * (255 - dog.astype(np.int32))) % 256
    return _gray_to_rgb(np.where(doubled > level, 255, 0).astype(np.uint8))


def lineart_standard(image: Map, _a: float, _b: float) -> Map:
    """Dark lines on a light ground as white line art: how far each pixel is below its blurred surroundings,
    scaled by the median of the clear lines."""
    pixels = image.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(pixels, (0, 0), 6.0) - pixels, axis=2).clip(0, 255)
    lines = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lines)) if lines.size else 0.0)
    return _gray_to_rgb((intensity * 127).clip(0, 255).astype(np.uint8))


def t2ia_color_grid(image: Map, _a: float, _b: float) -> Map:
    """The image's colours as a grid of 64-pixel cells (T2I-Adapter's colour map)."""
    height, width = image.shape[:2]
    cells = cv2.resize(image, (max(width // 64, 1), max(height // 64, 1)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (width, height), interpolation=cv2.INTER_NEAREST)


def tile_resample(image: Map, rate: float, _b: float) -> Map:
    """The image down-sampled by `rate` (a tile model's input), brought back to its size by the pipeline's
    own resize (Lanczos) here, so that the map shown is the one used."""
    if rate < 1.1:
        return image
    height, width = image.shape[:2]
    small = cv2.resize(image, (int(width / rate), int(height / rate)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_LANCZOS4)


def blur_gaussian(image: Map, sigma: float, _b: float) -> Map:
    """A Gaussian blur of `sigma` pixels."""
    return cv2.GaussianBlur(image, (0, 0), float(sigma))


def _recolor(image: Map, conversion: int, channel: int, gamma: float) -> Map:
    # A1111 converts its RGB array with OpenCV's BGR conversions; the recolor models were made with that map.
    value = cv2.cvtColor(image, conversion)[:, :, channel].astype(np.float32) / 255.0
    return _gray_to_rgb(((value**gamma) * 255.0).clip(0, 255).astype(np.uint8))


def recolor_luminance(image: Map, gamma: float, _b: float) -> Map:
    """The lightness (LAB's L) raised to `gamma`, as grey (for recolouring models)."""
    return _recolor(image, cv2.COLOR_BGR2LAB, 0, gamma)


def recolor_intensity(image: Map, gamma: float, _b: float) -> Map:
    """The value (HSV's V) raised to `gamma`, as grey (for recolouring models)."""
    return _recolor(image, cv2.COLOR_BGR2HSV, 2, gamma)


IMAGE_MAPS: dict[str, Callable[[Map, float, float], Map]] = {
    "canny": canny, "invert": invert, "threshold": threshold, "scribble_xdog": scribble_xdog,
    "lineart_standard": lineart_standard, "t2ia_color_grid": t2ia_color_grid, "tile_resample": tile_resample,
    "blur_gaussian": blur_gaussian, "recolor_luminance": recolor_luminance, "recolor_intensity": recolor_intensity,
}  # fmt: skip
