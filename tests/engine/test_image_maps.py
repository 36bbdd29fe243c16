"""The image-processing preprocessors on pictures whose maps are known: what each keeps, what it drops, and
the sliders' defaults and ranges as A1111's extension has them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from sdxl_refinery.control import ControlUnit, Preprocessor
from sdxl_refinery.engine.control import control_map
from sdxl_refinery.engine.image_maps import (
    lineart_standard,
    recolor_luminance,
    scribble_xdog,
    t2ia_color_grid,
    threshold,
    tile_resample,
)


def drawing() -> np.ndarray:
    """A black line 4 pixels wide on white, 96x128 (lineart_standard draws a median line at 127)."""
    image = np.full((96, 128, 3), 255, dtype=np.uint8)
    image[40:44, 16:112] = 0
    return image


def test_line_preprocessors_turn_dark_lines_white_on_black() -> None:
    for made in (scribble_xdog(drawing(), 32, 0), lineart_standard(drawing(), 0, 0)):
        assert made.shape == (96, 128, 3)
        assert made[42, 64].min() > 100 and made[10, 64].max() == 0 and made[80, 10].max() == 0


def test_threshold_keeps_pixels_whose_every_channel_passes() -> None:
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[0, 0] = (200, 200, 200)
    image[0, 1] = (200, 100, 200)  # one channel below: black
    made = threshold(image, 127, 0)
    assert made[0, 0].tolist() == [255, 255, 255] and made[0, 1].tolist() == [0, 0, 0]


def test_the_colour_grid_is_64_pixel_cells_of_the_colours() -> None:
    image = np.zeros((128, 192, 3), dtype=np.uint8)
    image[:, :96] = (200, 30, 30)
    image[:, 96:] = (30, 30, 200)
    made = t2ia_color_grid(image, 0, 0)
    assert made.shape == image.shape
    assert (made[:64, :64] == made[0, 0]).all() and (made[64:, 128:] == made[127, 191]).all()
    assert made[0, 0, 0] > 150 and made[127, 191, 2] > 150


def test_tile_resample_blurs_by_its_rate_and_keeps_the_size() -> None:
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(tile_resample(noise, 1.0, 0), noise)
    made = tile_resample(noise, 4.0, 0)
    assert made.shape == noise.shape and made.astype(np.float64).std() < noise.astype(np.float64).std() / 2


def test_recolor_luminance_is_grey_lightness_under_gamma() -> None:
    image = np.full((4, 4, 3), 128, dtype=np.uint8)
    plain, darker = recolor_luminance(image, 1.0, 0), recolor_luminance(image, 2.0, 0)
    lightness = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)[0, 0, 0]
    assert plain[0, 0].tolist() == [lightness] * 3 and darker[0, 0, 0] < plain[0, 0, 0]


def test_a_unit_runs_its_preprocessor_with_its_sliders() -> None:
    photo = Image.fromarray(drawing())
    unit = ControlUnit(model="m", image=photo, preprocessor="blur_gaussian", threshold_a=3)
    assert np.array_equal(np.asarray(control_map(unit, 128, 96)), cv2.GaussianBlur(drawing(), (0, 0), 3.0))
    default = ControlUnit(model="m", image=photo, preprocessor="binary")  # A1111's other name for threshold
    assert default.preprocessor is Preprocessor.THRESHOLD and default.sliders() == (127.0, 0.0)
    assert ControlUnit(model="m", image=photo, preprocessor="canny").sliders() == (100.0, 200.0)


@pytest.mark.parametrize(("preprocessor", "value", "words"), [("tile_resample", 64, "down-sampling rate is 1..8"),
                                                              ("canny", 0, "low threshold is 1..255"),
                                                              ("recolor_luminance", 3, "gamma is 0.1..2")])  # fmt: skip
def test_sliders_out_of_their_range_are_refused_naming_them(preprocessor: str, value: float, words: str) -> None:
    with pytest.raises(ValueError, match=f"threshold_a {value}: {preprocessor}'s {words}"):
        ControlUnit(model="m", image=Image.fromarray(drawing()), preprocessor=preprocessor, threshold_a=value)
