"""The pixels around an edit: A1111's resize modes, its "fill", the mask's alpha, the paste back."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from sdxl_refinery.editing import ResizeMode
from sdxl_refinery.engine.image_prep import fill_masked, fit, mask_of


def halves(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (0, 0, 255))
    ImageDraw.Draw(image).rectangle((0, 0, width // 2 - 1, height - 1), fill=(255, 0, 0))
    return image


def test_resize_modes_fit_the_size_as_a1111_does() -> None:
    wide = halves(200, 100)  # red left, blue right
    stretched = np.asarray(fit(wide, 64, 64, ResizeMode.JUST_RESIZE))
    assert stretched.shape == (64, 64, 3) and stretched[32, 5, 0] > 200 and stretched[32, 60, 2] > 200
    cropped = np.asarray(fit(wide, 64, 64, ResizeMode.CROP_AND_RESIZE))  # covers, cuts the sides: the middle
    assert cropped.shape == (64, 64, 3)
    assert cropped[32, 5, 0] > 200 and cropped[32, 60, 2] > 200  # still red | blue, from the centre 100x100
    filled = np.asarray(fit(wide, 64, 64, ResizeMode.RESIZE_AND_FILL))  # fits inside: 64x32, then the edges
    assert filled.shape == (64, 64, 3)
    assert filled[2, 5, 0] > 200 and filled[61, 60, 2] > 200  # the top and bottom bands repeat the image's edges


def test_fill_paints_the_masked_area_from_its_surroundings() -> None:
    image = halves(64, 64)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((8, 8, 23, 55), fill=255)  # inside the red half
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    inside = filled[8:56, 8:24]
    assert inside[..., 0].mean() > 180 and inside[..., 2].mean() < 80  # red, from around it
    keep = np.asarray(mask) == 0
    assert np.array_equal(filled[keep], np.asarray(image)[keep])


def test_a_mask_reads_from_its_alpha_when_it_has_one() -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    assert np.asarray(mask_of(rgba, invert=False))[1, 1] == 255 and np.asarray(mask_of(rgba, False))[0, 0] == 0
    grey = Image.new("L", (8, 8), 255)
    assert np.asarray(mask_of(grey, invert=True)).max() == 0
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))  # an unused alpha: the brightness counts
    assert np.asarray(mask_of(opaque, invert=False)).min() == 255
