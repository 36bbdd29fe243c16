"""The words of image to image, inpainting and hires fix: their choices, by A1111's names and numbers.

A1111's API sends `resize_mode` and `inpainting_fill` as numbers (0, 1, 2, ...) and
its UI and PNG text use words; each enum here takes either, in any case.
"""

from __future__ import annotations

from enum import Enum


class _Named(str, Enum):
    """A choice known by its words (any case) or by A1111's number (its position)."""

    @classmethod
    def _missing_(cls, value: object) -> _Named | None:
        members = list(cls)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(members):
            return members[value]
        text = str(value).strip().lower()
        if text.isdigit() and int(text) < len(members):
            return members[int(text)]
        return next((member for member in members if member.value.lower() == text), None)


class ResizeMode(_Named):
    """How an init image is fitted to the request's width and height (A1111's `resize_mode` 0-2)."""

    JUST_RESIZE = "Just resize"  # stretch to the size
    CROP_AND_RESIZE = "Crop and resize"  # cover the size, cut what sticks out (centred)
    RESIZE_AND_FILL = "Resize and fill"  # fit inside the size, fill the sides from the image's edges


class InpaintFill(_Named):
    """What the masked area starts from (A1111's `inpainting_fill` 0-3, "Masked content")."""

    FILL = "fill"  # the surrounding colours, blurred in
    ORIGINAL = "original"  # the init image itself
    LATENT_NOISE = "latent noise"  # random latents
    LATENT_NOTHING = "latent nothing"  # zero latents


class HiresUpscaler(_Named):
    """How hires fix enlarges the first pass: in latent space (interpolation) or as pixels (decode, resize, encode)."""

    LATENT = "Latent"
    LATENT_ANTIALIASED = "Latent (antialiased)"
    LATENT_BICUBIC = "Latent (bicubic)"
    LATENT_BICUBIC_ANTIALIASED = "Latent (bicubic antialiased)"
    LATENT_NEAREST = "Latent (nearest)"
    LATENT_NEAREST_EXACT = "Latent (nearest-exact)"
    LANCZOS = "Lanczos"
    NEAREST = "Nearest"

    @property
    def in_latent_space(self) -> bool:
        return self.value.startswith("Latent")

    @property
    def interpolation(self) -> tuple[str, bool]:
        """torch's `interpolate` mode and antialias flag of a latent upscaler (A1111's table)."""
        return _LATENT_MODES[self]


_LATENT_MODES = {
    HiresUpscaler.LATENT: ("bilinear", False),
    HiresUpscaler.LATENT_ANTIALIASED: ("bilinear", True),
    HiresUpscaler.LATENT_BICUBIC: ("bicubic", False),
    HiresUpscaler.LATENT_BICUBIC_ANTIALIASED: ("bicubic", True),
    HiresUpscaler.LATENT_NEAREST: ("nearest", False),
    HiresUpscaler.LATENT_NEAREST_EXACT: ("nearest-exact", False),
}


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int]:
    """The second pass's size, as A1111 computes it: `resize_x`/`resize_y` when given (one of them 0 keeps the
    aspect ratio), else the first size times `scale`; floored to multiples of 8 (SDXL's latents are 1/8)."""
    if resize_x == 0 and resize_y == 0:
        target_x, target_y = width * scale, height * scale
    elif resize_y == 0:
        target_x, target_y = resize_x, resize_x * height / width
    elif resize_x == 0:
        target_x, target_y = resize_y * width / height, resize_y
    else:
        target_x, target_y = resize_x, resize_y
    return int(target_x) // 8 * 8, int(target_y) // 8 * 8
