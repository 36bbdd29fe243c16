"""An upscale request: enlarge given images, with no diffusion (A1111's Extras tab and its API).

Queued and run like a generation: same jobs, progress (one step per tile), cancellation and PNG files.
Upscaler names are checked against the service's folder when the job is submitted and again when it runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .editing import HiresUpscaler
from .input_images import ImageField, InputImage
from .request import MAX_IMAGES, invalid_request_from

MAX_UPSCALE_FACTOR = 8.0
MAX_UPSCALED_SIDE = 8192  # a 4x upscale of a 2048 image
NONE = "None"  # A1111's name for no upscaler: the image is only resized (with Lanczos) to the size asked for
# Upscalers that need no model file, by A1111's names. Latent upscalers belong to hires fix only.
PIXEL_UPSCALERS = (NONE, HiresUpscaler.LANCZOS.value, HiresUpscaler.NEAREST.value)


class UpscaleRequest(BaseModel):
    """Images to enlarge: by a factor, or to a size; with one upscaler, or two blended.

    Raises:
        InvalidRequest: on construction, naming the first bad field and its rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    kind: Literal["upscale"] = Field("upscale", description="Marks an upscale job in the queue.")
    images: Annotated[tuple[ImageField, ...], Field(min_length=1, max_length=MAX_IMAGES)] = Field(
        description="The images to enlarge (base64 or data: URLs over HTTP)."
    )
    upscaler: str = Field("Lanczos", min_length=1, max_length=255, description="An upscaler model's name from "
                          "the upscaler folder, or None, Lanczos or Nearest.")  # fmt: skip
    scale: float = Field(2.0, ge=1.0, le=MAX_UPSCALE_FACTOR, description="Enlarge by this factor (A1111's "
                         "upscaling_resize), unless width and height are given.")  # fmt: skip
    width: int = Field(0, ge=0, le=MAX_UPSCALED_SIDE, description="Enlarge to this width (0: by scale).")
    height: int = Field(0, ge=0, le=MAX_UPSCALED_SIDE, description="Enlarge to this height (0: by scale).")
    crop: bool = Field(True, description="To a size: crop to its aspect ratio rather than stretch (A1111's "
                       "upscaling_crop).")  # fmt: skip
    upscaler_2: str | None = Field(None, min_length=1, max_length=255, description="A second upscaler, blended in.")
    upscaler_2_visibility: float = Field(0.0, ge=0.0, le=1.0, description="The second upscaler's share of each "
                                         "pixel (A1111's extras_upscaler_2_visibility).")  # fmt: skip

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise invalid_request_from(error) from None

    @model_validator(mode="after")
    def _sizes_fit(self) -> UpscaleRequest:
        if (self.width == 0) != (self.height == 0):
            raise ValueError("width: give both width and height to upscale to a size, or neither to scale")
        for index, image in enumerate(self.images):
            if image is None:
                raise ValueError(f"images.{index}: must be an image")
            width, height = self.size_for(image.width, image.height)
            if max(width, height) > MAX_UPSCALED_SIDE:
                raise ValueError(f"scale: image {index} ({image.width}x{image.height}) would become {width}x{height}; "
                                 f"at most {MAX_UPSCALED_SIDE} pixels a side")  # fmt: skip
        return self

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of `width` x `height` comes out at."""
        if self.width and self.height:
            return self.width, self.height
        return max(1, round(width * self.scale)), max(1, round(height * self.scale))

    @property
    def n(self) -> int:
        """Images this request makes: one per image given."""
        return len(self.images)

    @property
    def upscaler_names(self) -> list[str]:
        """Each upscaler the request uses (the second only when it shows)."""
        second = [self.upscaler_2] if self.upscaler_2 and self.upscaler_2_visibility > 0 else []
        return [self.upscaler, *second]

    @property
    def missing_images(self) -> list[str]:
        """Images held only as a recorded hash."""
        return [f"images.{index}" for index, image in enumerate(self.images) if image and image.is_reference]

    def image_at(self, name: str) -> InputImage | None:
        """The image a `missing_images` name (`images.N`) points at."""
        return self.images[int(name.split(".")[1])]

    def recorded(self) -> dict[str, Any]:
        """The request as results and PNGs record it: images by hash and size."""
        return self.model_dump(mode="json", context={"images": "summary"})
