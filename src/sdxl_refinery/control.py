"""ControlNet units: what a request asks a ControlNet to do (A1111's ControlNet extension's unit, by its names).

A unit names a ControlNet model of the server's folder, gives a control image, and says how strongly and
over which part of the schedule it guides the base. The image is first turned into the map the model was
trained on by a preprocessor (A1111's `module`): pure image processing in-process, depth estimators and
openpose with weights from the annotator folder.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .editing import ResizeMode, _Named
from .input_images import ImageField

MAX_CONTROLNETS = 4
MAX_IMAGE_PROMPTS = 4
MAX_WEIGHT = 2.0  # A1111's slider


class ControlMode(_Named):
    """A1111's control modes (0-2): Balanced is what diffusers' ControlNet pipelines compute; the others weaken
    the shallow residuals as diffusers' guess mode does, and "ControlNet is more important" also leaves the
    unconditional half of guidance uncontrolled (engine/control.py)."""

    BALANCED = "Balanced"
    PROMPT = "My prompt is more important"
    CONTROLNET = "ControlNet is more important"


class Preprocessor(_Named):
    """Preprocessors by A1111's module names: pure image processing, and depth and pose estimators whose
    weights come from the annotator folder (annotators.py)."""

    NONE = "none"  # the image is the map already (an edge map, a depth map, a pose skeleton...)
    CANNY = "canny"  # OpenCV's Canny edges, thresholds threshold_a (low) and threshold_b (high)
    INVERT = "invert"  # white background, black lines -> black background, white lines (a sketch)
    THRESHOLD = "threshold"  # white where every channel passes threshold_a
    SCRIBBLE_XDOG = "scribble_xdog"  # a scribble by difference of Gaussians, threshold_a
    LINEART_STANDARD = "lineart_standard"  # dark lines on a light ground as line art
    T2IA_COLOR_GRID = "t2ia_color_grid"  # the colours in 64-pixel cells
    TILE_RESAMPLE = "tile_resample"  # down-sampled by threshold_a (for tile models)
    BLUR_GAUSSIAN = "blur_gaussian"  # blurred, sigma threshold_a
    RECOLOR_LUMINANCE = "recolor_luminance"  # lightness as grey, gamma threshold_a
    RECOLOR_INTENSITY = "recolor_intensity"  # HSV value as grey, gamma threshold_a
    DEPTH_MIDAS = "depth_midas"  # the depth preprocessors: a transformers depth model from the annotator folder
    DEPTH_ANYTHING = "depth_anything"
    DEPTH_ANYTHING_V2 = "depth_anything_v2"
    DEPTH_ZOE = "depth_zoe"
    OPENPOSE = "openpose"  # bodies: a transformers person detector and VitPose from the annotator folder


DEPTH_PREPROCESSORS = ("depth_midas", "depth_anything", "depth_anything_v2", "depth_zoe")
MODEL_PREPROCESSORS = (*DEPTH_PREPROCESSORS, "openpose")  # those whose weights come from the annotator folder
# A1111 module names of annotators whose models Refinery does not load (hands and faces, lines, segmentation...).
OTHER_ANNOTATORS = ("depth_leres", "depth_hand", "openpose", "dw_openpose", "animal_openpose", "densepose",
                    "lineart", "softedge", "hed", "pidinet", "mlsd", "normal", "seg", "scribble_hed",
                    "scribble_pidinet", "teed", "mediapipe_face", "tile_colorfix", "reference", "instant_id",
                    "inpaint_only", "recolor", "revision", "clip_vision", "t2ia")  # fmt: skip
A1111_ALIASES = {"invert (from white bg & black line)": "invert", "canny": "canny", "none": "none",
                 "depth": "depth_midas", "lineart_standard (from white bg & black line)": "lineart_standard",
                 "binary": "threshold", "color": "t2ia_color_grid"}  # fmt: skip
# The preprocessors' sliders (A1111's threshold_a, threshold_b): name, default, lowest, highest.
SLIDERS_A = {"canny": ("low threshold", 100.0, 1.0, 255.0),
             "threshold": ("binarization threshold", 127.0, 0.0, 255.0),
             "scribble_xdog": ("XDoG threshold", 32.0, 1.0, 64.0),
             "tile_resample": ("down-sampling rate", 1.0, 1.0, 8.0), "blur_gaussian": ("sigma", 9.0, 0.01, 64.0),
             "recolor_luminance": ("gamma", 1.0, 0.1, 2.0), "recolor_intensity": ("gamma", 1.0, 0.1, 2.0)}  # fmt: skip
SLIDERS_B = {"canny": ("high threshold", 200.0, 1.0, 255.0)}


class ControlUnit(BaseModel):
    """One ControlNet guiding the base.

    Raises:
        ValueError: (in a request) naming the unit's field and its rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: str = Field(min_length=1, max_length=255, description="A ControlNet from the ControlNet folder, by name.")
    image: ImageField = Field(description="The control image (base64 over HTTP).")
    weight: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, description="How strongly it guides (0 = not at all).")
    guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="Share of the schedule before it starts.")
    guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="Share of the schedule where it stops.")
    control_mode: ControlMode = Field(ControlMode.BALANCED, description="A1111's Balanced (0), My prompt is more "
                                      "important (1), ControlNet is more important (2).")  # fmt: skip
    resize_mode: ResizeMode = Field(ResizeMode.CROP_AND_RESIZE, description="How the control image is fitted "
                                    "to the image's size (A1111's default: Crop and resize).")  # fmt: skip
    preprocessor: Annotated[Preprocessor, Field(description="What turns the image into the map: none, canny, "
                                                "invert, a depth estimator (depth_midas, depth_anything, "
                                                "depth_anything_v2, depth_zoe) or openpose (weights from the "
                                                "annotator folder).")] = Preprocessor.NONE  # fmt: skip
    threshold_a: float | None = Field(None, description="The preprocessor's first slider (A1111's threshold_a): "
                                      "canny's low threshold (1..255, default 100), threshold's level (0..255, "
                                      "127), scribble_xdog's (1..64, 32), tile_resample's rate (1..8, 1), "
                                      "blur_gaussian's sigma (0.01..64, 9), recolor's gamma (0.1..2, 1); absent: "
                                      "the default.")  # fmt: skip
    threshold_b: float | None = Field(None, description="The second slider: canny's high threshold (1..255, "
                                      "default 200).")  # fmt: skip

    @field_validator("preprocessor", mode="before")
    @classmethod
    def _known_preprocessor(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = A1111_ALIASES.get(value.strip().lower(), value.strip().lower())
            if text.startswith("ip-adapter"):
                raise ValueError(f"{value!r}: IP-Adapters are image prompts (the request's image_prompts)")
            known = {member.value for member in Preprocessor}
            if text not in known and any(text.startswith(name) for name in OTHER_ANNOTATORS):
                raise ValueError(f"{value!r} needs annotator weights of a kind Refinery does not load (it loads "
                                 f"{', '.join(MODEL_PREPROCESSORS)}); give a map made already with preprocessor "
                                 "'none'")  # fmt: skip
            if text not in known:
                names = ", ".join(member.value for member in Preprocessor)
                raise ValueError(f"{value!r} is not a preprocessor Refinery runs; known: {names}")
            return text
        return value

    @model_validator(mode="after")
    def _schedule_and_mode(self) -> ControlUnit:
        if self.guidance_end <= self.guidance_start:
            raise ValueError(f"guidance_end {self.guidance_end:g} must be after guidance_start {self.guidance_start:g}")
        if self.image is None:
            raise ValueError("image: a control image is required")
        for name, value, sliders in (("threshold_a", self.threshold_a, SLIDERS_A),
                                     ("threshold_b", self.threshold_b, SLIDERS_B)):  # fmt: skip
            slider = sliders.get(self.preprocessor.value)
            if value is not None and slider is not None and not slider[2] <= value <= slider[3]:
                raise ValueError(f"{name} {value:g}: {self.preprocessor.value}'s {slider[0]} is "
                                 f"{slider[2]:g}..{slider[3]:g}")  # fmt: skip
        return self

    def sliders(self) -> tuple[float, float]:
        """threshold_a and threshold_b as the preprocessor runs them (its defaults where not given)."""
        first, second = SLIDERS_A.get(self.preprocessor.value), SLIDERS_B.get(self.preprocessor.value)
        a = self.threshold_a if self.threshold_a is not None else (first[1] if first else 0.0)
        b = self.threshold_b if self.threshold_b is not None else (second[1] if second else 0.0)
        return a, b

    def recorded(self) -> dict[str, Any]:
        """The unit as results record it: the image by hash and size."""
        return self.model_dump(mode="json", context={"images": "summary"})

    def a1111_text(self) -> str:
        """The unit as A1111 writes it in a PNG's `parameters` (the value of `ControlNet 0`)."""
        return (f"Module: {self.preprocessor.value}, Model: {self.model}, Weight: {self.weight:g}, "
                f"Resize Mode: {self.resize_mode.value}, Guidance Start: {self.guidance_start:g}, "
                f"Guidance End: {self.guidance_end:g}, Control Mode: {self.control_mode.value}")  # fmt: skip


class ImagePrompt(BaseModel):
    """A reference image guiding the base through an IP-Adapter (Fooocus's Image Prompt)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    model: str = Field(min_length=1, max_length=255, description="An IP-Adapter from the IP-Adapter folder, by name.")
    image: ImageField = Field(description="The reference image (base64 over HTTP).")
    weight: float = Field(1.0, ge=0.0, le=MAX_WEIGHT, description="How strongly it guides (the adapter's scale).")

    @model_validator(mode="after")
    def _has_an_image(self) -> ImagePrompt:
        if self.image is None:
            raise ValueError("image: a reference image is required")
        return self

    def a1111_text(self) -> str:
        """The image prompt as a PNG's `parameters` record it (the value of `IP-Adapter 0`)."""
        digest = self.image.short_hash if self.image is not None else "?"
        return f"Model: {self.model}, Weight: {self.weight:g}, Image hash: {digest}"
