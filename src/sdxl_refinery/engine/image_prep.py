"""Pixels in and out of an edit: fitting the init image and mask to the size, filling, cropping, compositing.

Pure image work (PIL and numpy), done before the first step and after the decode.
The rules are A1111's, so its clients get what they expect: the mask is inverted,
fitted like the image and blurred; "only masked" inpainting works on the mask's
padded box stretched to the processing size and pastes the result back; every
pixel the (blurred) mask leaves at zero comes back from the original unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter, ImageOps

from ..editing import InpaintFill, ResizeMode
from ..request import GenerationRequest

_FILL_RADII = (256, 64, 16, 4, 1)  # coarse to fine: far pixels get the broad colour, near ones the local one


def fit(image: Image.Image, width: int, height: int, mode: ResizeMode) -> Image.Image:
    """`image` at exactly width x height, by A1111's resize modes (Lanczos resampling)."""
    if mode is ResizeMode.JUST_RESIZE or image.size == (width, height):
        return image.resize((width, height), Image.Resampling.LANCZOS)
    cover = mode is ResizeMode.CROP_AND_RESIZE
    ratio = (max if cover else min)(width / image.width, height / image.height)
    scaled_w, scaled_h = max(1, round(image.width * ratio)), max(1, round(image.height * ratio))
    scaled = image.resize((scaled_w, scaled_h), Image.Resampling.LANCZOS)
    left, top = (width - scaled_w) // 2, (height - scaled_h) // 2
    if cover:
        return scaled.crop((-left, -top, -left + width, -top + height))
    canvas = scaled.resize((width, height), Image.Resampling.LANCZOS)  # the sides: the image's edges stretched
    if scaled_w < width:
        canvas.paste(scaled.crop((0, 0, 1, scaled_h)).resize((left, height)), (0, 0))
        canvas.paste(scaled.crop((scaled_w - 1, 0, scaled_w, scaled_h)).resize((width - left - scaled_w, height)),
                     (left + scaled_w, 0))  # fmt: skip
    if scaled_h < height:
        canvas.paste(scaled.crop((0, 0, scaled_w, 1)).resize((width, top)), (0, 0))
        canvas.paste(scaled.crop((0, scaled_h - 1, scaled_w, scaled_h)).resize((width, height - top - scaled_h)),
                     (0, top + scaled_h))  # fmt: skip
    canvas.paste(scaled, (left, top))
    return canvas


def mask_of(mask: Image.Image, invert: bool) -> Image.Image:
    """A mask as 8-bit grey, white = repaint. Where the mask has an alpha channel that is used, the alpha is the
    mask (opaque = repaint, as A1111 reads one); else its brightness."""
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        grey = alpha if alpha.getextrema() != (255, 255) else mask.convert("L")
    else:
        grey = mask.convert("L")
    return ImageOps.invert(grey) if invert else grey


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it, blurred in from coarse to fine
    (a normalised blur of the kept pixels: each colour weighed by how much kept image is near)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    keep = (np.asarray(mask) < 128).astype(np.float32)[..., None]
    kept = Image.fromarray((pixels * keep).astype(np.uint8))
    weight_image = Image.fromarray((keep[..., 0] * 255).astype(np.uint8))
    filled = pixels * keep
    for radius in _FILL_RADII:
        colour = np.asarray(kept.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
        weight = np.asarray(weight_image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)[..., None] / 255
        estimate = colour / np.maximum(weight, 1 / 255)
        support = np.clip(weight * 4, 0, 1)  # trust the finer estimate where enough kept pixels are near
        filled = np.where(keep > 0, pixels, filled * (1 - support) + estimate * support)
    return Image.fromarray(np.clip(filled, 0, 255).round().astype(np.uint8))


@dataclass
class EditInputs:
    """An edit's pixels, prepared once per request.

    Attributes:
        init: what the base starts from, at width x height (filled when the request asks for it).
        mask: the blurred mask at width x height (None for plain img2img).
        original: the whole init image at its output size, for compositing.
        full_mask: the blurred mask at the output size, for compositing.
        box: where "only masked" takes its crop from and pastes back (None for the whole picture).
    """

    init: Image.Image
    mask: Image.Image | None
    original: Image.Image
    full_mask: Image.Image | None
    box: tuple[int, int, int, int] | None

    def finish(self, image: Image.Image) -> Image.Image:
        """A decoded image put back into the original: pasted into its box, masked area only."""
        if self.full_mask is None:
            return image
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.copy()
            canvas.paste(image.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
            image = canvas
        return Image.composite(image, self.original, self.full_mask)


def prepare(request: GenerationRequest) -> EditInputs:
    """The pixels of an img2img or inpainting request (its init image must be given, not a reference).

    Raises:
        InvalidRequest: an image field holds only a recorded hash.
    """
    assert request.init_image is not None
    width, height = request.width, request.height
    # 1. The image, and the mask fitted the same way (a mask of another size is stretched onto the image).
    init = request.init_image.open().convert("RGB")
    if request.mask_image is None:
        original = fit(init, width, height, request.resize_mode)
        return EditInputs(original, None, original, None, None)
    raw_mask = mask_of(request.mask_image.open(), request.mask_invert)
    if request.inpaint_full_res:
        original, mask = init, raw_mask.resize(init.size, Image.Resampling.LANCZOS)
    else:
        original = fit(init, width, height, request.resize_mode)
        mask = fit(raw_mask.resize(init.size, Image.Resampling.LANCZOS), width, height, request.resize_mode)
    # 2. The blurred edge, then A1111's "fill" content.
    blurred = mask.filter(ImageFilter.GaussianBlur(request.mask_blur)) if request.mask_blur else mask
    start = fill_masked(original, mask) if request.inpainting_fill is InpaintFill.FILL else original
    if not request.inpaint_full_res:
        return EditInputs(start, blurred, original, blurred, None)
    # 3. Only masked: the padded box around the mask, widened to the processing aspect, stretched to the size.
    x1, y1, x2, y2 = VaeImageProcessor.get_crop_region(mask, width, height, pad=request.inpaint_full_res_padding)
    box = (int(x1), int(y1), int(x2), int(y2))
    crop = start.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    crop_mask = blurred.crop(box).resize((width, height), Image.Resampling.LANCZOS)
    return EditInputs(crop, crop_mask, original, blurred, box)
