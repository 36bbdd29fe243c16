"""The words every floor shares: requests, results, progress and the enums.

All validation of user input lives here, so the library, the command line,
every HTTP route, the queue payload and the web form accept and refuse exactly
the same things. A bad field raises `InvalidRequest` naming the field and the
rule before any model work starts.
"""

from __future__ import annotations

import unicodedata
from enum import Enum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .control import MAX_CONTROLNETS, MAX_IMAGE_PROMPTS, ControlUnit, ImagePrompt
from .editing import HiresUpscaler, InpaintFill, ResizeMode, hires_size
from .errors import InvalidRequest
from .fields import Faces, FieldSpec, field_table
from .input_images import ImageField, InputImage, parse_input_image
from .loras import MAX_LORAS, LoraRef, split_prompt

# The run options live on the ground floor (options.py), progress and results in results.py; re-exported here
# for the library's users.
from .options import Precision as Precision
from .options import SpeedOptions as SpeedOptions
from .options import Toggle as Toggle
from .options import validate_device as validate_device
from .options import validate_precision as validate_precision
from .options import validate_toggle as validate_toggle
from .prompt_syntax import check_attention
from .results import CancelToken as CancelToken
from .results import GenerationResult as GenerationResult
from .results import Progress as Progress
from .results import ProgressCallback as ProgressCallback
from .samplers import Sampler, ScheduleType, check_pair, split_combined
from .steps import plan_steps, require_both_stages

MIN_SIZE = 64  # A1111 accepts 64x64 (8x8 latents); SDXL is trained around 1024x1024
MAX_SIZE = 4096
MAX_STEPS = 500
MAX_IMAGES = 16
MAX_GUIDANCE = 30.0
MAX_SEED = 2**32 - 1
MAX_CLIP_SKIP = 12  # CLIP ViT-L's layer count, A1111's slider; a model with fewer layers refuses more
HIGH_QUALITY_GUIDANCE = 8.0  # the default: the documented call's high_quality=True
STANDARD_GUIDANCE = 7.5  # the documented call's high_quality=False, OpenAI's standard quality


MAX_SCHEDULE = 1000  # SDXL's training timesteps: no sampler schedule can be longer
MAX_HIRES_SCALE = 4.0
MAX_MASK_BLUR = 64
MAX_MASK_PADDING = 256


class Mode(str, Enum):
    """How the refiner takes over from the base."""

    SEQUENTIAL = "sequential"  # base runs to the end, refiner does img2img on its latents
    HANDOFF = "handoff"  # ensemble of experts: refiner finishes the base's schedule


class GenerationRequest(BaseModel):
    """One prompt to render: every field a face can set, validated on construction.

    This class is the field table: each field is declared here once, with its
    default, bounds, description and the names the faces give it (`Faces`); the
    command line, the A1111 adapter, the PNG metadata and the web page are
    derived from it (see `fields.field_table`).

    Raises:
        InvalidRequest: on construction, naming the first bad field and its rule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, arbitrary_types_allowed=True)

    prompt: Annotated[str, Faces(a1111="prompt")] = Field(description="What to draw; must not be blank.")
    negative_prompt: Annotated[str, Faces(cli="--negative-prompt", cli_short="-N", a1111="negative_prompt")] = Field(
        "", description="What to keep out of the image."
    )
    num_inference_steps: Annotated[int, Faces(cli="--steps", a1111="steps", label="Steps")] = Field(
        50, ge=1, le=MAX_STEPS, description="Base model steps (the schedule's length in handoff mode)."
    )
    width: Annotated[int, Faces(cli="--width", a1111="width", label="Size")] = Field(
        1024, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8, description="Image width in pixels."
    )
    height: Annotated[int, Faces(cli="--height", a1111="height", label="Size")] = Field(
        1024, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=8, description="Image height in pixels."
    )
    refiner_steps: Annotated[int, Faces(cli="--refiner-steps", label="Refiner steps")] = Field(
        30, ge=1, le=MAX_STEPS, description="Refiner steps actually executed (sequential mode)."
    )
    refiner_strength: Annotated[float, Faces(cli="--refiner-strength", label="Refiner strength")] = Field(
        0.3, gt=0.0, le=1.0, description="Share of the schedule the refiner redoes (sequential mode)."
    )
    mode: Annotated[Mode, Faces(cli="--mode", label="Refiner mode")] = Field(
        Mode.SEQUENTIAL, description="sequential: the refiner redoes the end; handoff: it finishes the schedule."
    )
    switch_at: Annotated[float, Faces(cli="--switch-at", a1111="refiner_switch_at", label="Refiner switch at")] = Field(
        0.8, gt=0.0, lt=1.0, description="Handoff point, as a share of the schedule (handoff mode)."
    )
    guidance_scale: Annotated[float, Faces(cli="--guidance", a1111="cfg_scale", label="CFG scale")] = Field(
        HIGH_QUALITY_GUIDANCE, ge=0.0, le=MAX_GUIDANCE, description="How closely to follow the prompt (CFG scale)."
    )
    guidance_rescale: Annotated[float | None, Faces(cli="--guidance-rescale", label="CFG rescale")] = Field(
        None, ge=0.0, le=1.0, description="Guidance rescale (Lin et al.) for the base; absent: the model's own, "
        "0.7 for zero-terminal-SNR models, else 0.",
    )  # fmt: skip
    sampler: Annotated[Sampler, Faces(cli="--sampler", a1111="sampler_name", label="Sampler")] = Field(
        Sampler.EULER, description="How each step moves toward the image, by its A1111 name (any case; "
        "'DPM++ 2M Karras' also sets the schedule).",
    )  # fmt: skip
    scheduler: Annotated[ScheduleType, Faces(cli="--schedule", a1111="scheduler", label="Schedule type")] = Field(
        ScheduleType.AUTOMATIC, description="How the noise levels are spaced; Automatic is the sampler's own "
        "default, as in A1111 (the model's own schedule for Euler).",
    )  # fmt: skip
    refiner_sampler: Annotated[Sampler | None, Faces(cli="--refiner-sampler", label="Refiner sampler")] = Field(
        None, description="The refiner's sampler; the base's when absent."
    )
    refiner_scheduler: Annotated[
        ScheduleType | None, Faces(cli="--refiner-schedule", label="Refiner schedule type")
    ] = Field(None, description="The refiner's schedule type; the base's when absent.")
    seed: Annotated[int | None, Faces(cli="--seed", a1111="seed", label="Seed")] = Field(
        None, ge=0, le=MAX_SEED, description="First image's seed; random when absent."
    )
    n: Annotated[int, Faces(cli="-n", a1111="batch_size")] = Field(
        1, ge=1, le=MAX_IMAGES, description="Images in this request, seeds seed, seed+1, ..."
    )
    use_refinement: Annotated[bool, Faces(cli="--refine/--no-refine")] = Field(
        True, description="Run the refiner after the base (the quality promise; off only on request)."
    )
    clip_skip: Annotated[
        int, Faces(cli="--clip-skip", a1111="clip_skip", a1111_option="CLIP_stop_at_last_layers", label="Clip skip")
    ] = Field(
        1, ge=1, le=MAX_CLIP_SKIP,
        description="Condition on the text encoders' output this many layers from the end: 1 is the model's own "
        "(SDXL's penultimate layer), 2 one layer earlier (A1111's Clip skip, ComfyUI's CLIPSetLastLayer).",
    )  # fmt: skip
    aesthetic_score: Annotated[float, Faces(cli="--aesthetic-score", label="Aesthetic score")] = Field(
        6.0, ge=0.0, le=10.0, description="Refiner's aesthetic conditioning."
    )
    negative_aesthetic_score: Annotated[float, Faces(cli="--negative-aesthetic-score")] = Field(
        2.5, ge=0.0, le=10.0, description="Refiner's aesthetic conditioning for the negative prompt."
    )
    # LoRAs also come from the prompt's <lora:name:weight> tags (A1111's syntax): see `all_loras`.
    loras: Annotated[tuple[LoraRef, ...], Faces(web=False)] = Field(
        (), max_length=MAX_LORAS, description="LoRAs for the base model: [{name, weight}], weights -5..5."
    )

    # Checkpoints per request: names from the server's models folder (the library and CLI also take paths).
    base_model: Annotated[str | None, Faces(a1111_option="sd_model_checkpoint", web=False)] = Field(
        None, min_length=1, max_length=512, description="Base checkpoint: a name from the models folder (or its "
        "A1111 title); the service's own base when absent.",
    )  # fmt: skip
    refiner_model: Annotated[str | None, Faces(a1111="refiner_checkpoint", web=False)] = Field(
        None, min_length=1, max_length=512, description="Refiner checkpoint, likewise; the service's own when absent."
    )
    # Image to image and inpainting (A1111's img2img); the A1111 adapter maps `init_images` and `mask` itself.
    init_image: Annotated[ImageField, Faces(cli="--init-image", web=False)] = Field(
        None, description="Image to start from (img2img); the size defaults to its own, floored to a multiple of 8."
    )
    strength: Annotated[float, Faces(cli="--strength", a1111="denoising_strength", label="Denoising strength")] = Field(
        0.75, gt=0.0, le=1.0, description="Share of the init image (or hires pass) redrawn: steps x strength."
    )
    resize_mode: Annotated[ResizeMode, Faces(cli="--resize-mode", a1111="resize_mode", label="Resize mode")] = Field(
        ResizeMode.JUST_RESIZE, description="How the init image is fitted to width x height (A1111's 0, 1, 2)."
    )
    mask_image: Annotated[ImageField, Faces(cli="--mask", web=False)] = Field(
        None, description="Inpainting mask for init_image: white is repainted, black kept (resized to the image)."
    )
    mask_blur: Annotated[int, Faces(cli="--mask-blur", a1111="mask_blur", label="Mask blur")] = Field(
        4, ge=0, le=MAX_MASK_BLUR, description="Gaussian blur radius of the mask's edge, in pixels."
    )
    inpainting_fill: Annotated[
        InpaintFill, Faces(cli="--masked-content", a1111="inpainting_fill", label="Masked content")
    ] = Field(InpaintFill.ORIGINAL, description="What the masked area starts from (A1111's 0-3).")
    inpaint_full_res: Annotated[bool, Faces(cli="--only-masked/--whole-picture", a1111="inpaint_full_res")] = Field(
        False, description="Inpaint only the masked area (with padding) at full width x height, pasted back."
    )
    inpaint_full_res_padding: Annotated[
        int, Faces(cli="--masked-padding", a1111="inpaint_full_res_padding", label="Masked area padding")
    ] = Field(32, ge=0, le=MAX_MASK_PADDING, description="Pixels around the mask kept in view (only masked).")
    mask_invert: Annotated[bool, Faces(cli="--invert-mask/--no-invert-mask", label="Mask inverted")] = Field(
        False, description="Repaint the black part of the mask instead (A1111's inpainting_mask_invert)."
    )
    # Hires fix (A1111's txt2img enable_hr): base at width x height, enlarge, a second base pass, then the refiner.
    enable_hr: Annotated[bool, Faces(cli="--hires/--no-hires", a1111="enable_hr")] = Field(
        False, description="Hires fix: render at width x height, upscale, redraw at the larger size (strength)."
    )
    hr_scale: Annotated[float, Faces(cli="--hires-scale", a1111="hr_scale", label="Hires upscale")] = Field(
        2.0, ge=1.0, le=MAX_HIRES_SCALE, description="Hires fix's factor, unless hr_resize_x/y give the size."
    )
    hr_resize_x: Annotated[int, Faces(cli="--hires-width", a1111="hr_resize_x", label="Hires resize")] = Field(
        0, ge=0, le=MAX_SIZE, description="Hires fix's width (0: from hr_scale, or the aspect ratio)."
    )
    hr_resize_y: Annotated[int, Faces(cli="--hires-height", a1111="hr_resize_y", label="Hires resize")] = Field(
        0, ge=0, le=MAX_SIZE, description="Hires fix's height (0: from hr_scale, or the aspect ratio)."
    )
    hr_upscaler: Annotated[
        str, Faces(cli="--hires-upscaler", a1111="hr_upscaler", label="Hires upscaler", choices_from=HiresUpscaler)
    ] = Field(HiresUpscaler.LATENT.value, min_length=1, max_length=255, description="How the first pass is "
              "enlarged: in latent space, as pixels (Lanczos, Nearest), or by an upscaler model from the upscaler "
              "folder, by its name.")  # fmt: skip
    # ControlNet (A1111's ControlNet extension's units): guide the base by edges, depth, pose... maps.
    controlnets: Annotated[tuple[ControlUnit, ...], Faces(web=False)] = Field(
        (), max_length=MAX_CONTROLNETS, description="ControlNet units guiding the base: [{model, image, weight, "
        "guidance_start, guidance_end, control_mode, resize_mode, preprocessor, threshold_a, threshold_b}].",
    )  # fmt: skip
    image_prompts: Annotated[tuple[ImagePrompt, ...], Faces(web=False)] = Field(
        (), max_length=MAX_IMAGE_PROMPTS, description="Reference images guiding the base through IP-Adapters: "
        "[{model, image, weight}].",
    )  # fmt: skip
    hr_second_pass_steps: Annotated[
        int, Faces(cli="--hires-steps", a1111="hr_second_pass_steps", label="Hires steps")
    ] = Field(0, ge=0, le=MAX_STEPS, description="Schedule length of the hires pass (0: num_inference_steps).")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise invalid_request_from(error) from None

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text_is_plain(cls, value: str) -> str:
        check_prompt_text(value)
        if (why := check_attention(value)) is not None:
            raise ValueError(why)
        return value

    @field_validator("hr_upscaler", mode="before")
    @classmethod
    def _builtin_upscaler_names(cls, value: Any) -> Any:
        """Built-in upscalers by their canonical names (any case); anything else names an upscaler model."""
        if isinstance(value, HiresUpscaler):
            return value.value
        if isinstance(value, str):
            builtin = next((member for member in HiresUpscaler if member.value.lower() == value.strip().lower()), None)
            return builtin.value if builtin is not None else value.strip()
        return value

    @property
    def hires_upscaler(self) -> HiresUpscaler | None:
        """Hires fix's built-in upscaler, or None when `hr_upscaler` names an upscaler model."""
        return next((member for member in HiresUpscaler if member.value == self.hr_upscaler), None)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        # Zero-width and other invisible format characters (Unicode category Cf) are blank too.
        if all(char.isspace() or unicodedata.category(char) == "Cf" for char in value):
            raise ValueError("must not be empty or blank")
        return value

    @model_validator(mode="before")
    @classmethod
    def _split_combined_sampler_names(cls, data: Any) -> Any:
        """A1111's older names: sampler "DPM++ 2M Karras" is sampler "DPM++ 2M" with schedule "Karras"."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for sampler_field, schedule_field in (("sampler", "scheduler"), ("refiner_sampler", "refiner_scheduler")):
            name = data.get(sampler_field)
            split = split_combined(name) if isinstance(name, str) else None
            if split is None:
                continue
            schedule = data.get(schedule_field)
            if schedule not in (None, ScheduleType.AUTOMATIC) and ScheduleType(schedule) is not split[1]:
                raise ValueError(f"{schedule_field}: {name!r} names schedule {split[1].value}, but "
                                 f"{schedule_field} says {schedule!r}")  # fmt: skip
            data[sampler_field], data[schedule_field] = split
        return data

    @model_validator(mode="after")
    def _samplers_support_their_schedules(self) -> GenerationRequest:
        for name, (sampler, schedule) in (
            ("scheduler", (self.sampler, self.scheduler)),
            ("refiner_scheduler", self.refiner_sampling),
        ):
            if (why := check_pair(sampler, schedule)) is not None:
                raise ValueError(f"{name}: {why}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _size_from_init_image(cls, data: Any) -> Any:
        """Without width and height, an img2img request keeps its init image's size (floored to multiples of 8,
        scaled down to fit MAX_SIZE): what a library caller or an OpenAI edit expects back."""
        if not isinstance(data, dict) or data.get("init_image") is None or "width" in data or "height" in data:
            return data
        try:
            image = parse_input_image(data["init_image"])
        except ValueError as error:
            raise InvalidRequest("init_image", str(error)) from None
        fit = min(1.0, MAX_SIZE / max(image.width, image.height))
        width, height = (max(MIN_SIZE, int(side * fit) // 8 * 8) for side in (image.width, image.height))
        return {**data, "init_image": image, "width": width, "height": height}

    @model_validator(mode="after")
    def _controlnets_fit_the_run(self) -> GenerationRequest:
        if not self.controlnets:
            return self
        from_image = self.enable_hr or (self.init_image is not None and self.mask_image is None)
        if from_image and self.mode is Mode.HANDOFF:
            raise ValueError("controlnets: image to image (hires fix's second pass too) with ControlNet runs in "
                             "sequential mode only (diffusers' ControlNet img2img pipeline cannot hand over "
                             "mid-schedule)")  # fmt: skip
        if self.guidance_rescale:
            raise ValueError("controlnets: guidance_rescale is not available with ControlNet (diffusers' ControlNet "
                             "pipelines do not rescale)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _edits_fit_together(self) -> GenerationRequest:
        if self.mask_image is not None and self.init_image is None:
            raise ValueError("mask_image: needs an init_image to paint into")
        if self.enable_hr and self.init_image is not None:
            raise ValueError("enable_hr: hires fix is for text to image; an init image is redrawn at its size")
        if self.enable_hr:
            width, height = self.hires_size
            if not (MIN_SIZE <= width <= MAX_SIZE and MIN_SIZE <= height <= MAX_SIZE):
                raise ValueError(f"hr_scale: the hires size {width}x{height} must be within {MIN_SIZE}..{MAX_SIZE} "
                                 f"on each side")  # fmt: skip
        return self

    @property
    def hires_size(self) -> tuple[int, int]:
        """The hires pass's width and height (A1111's rules: `editing.hires_size`)."""
        return hires_size(self.width, self.height, self.hr_scale, self.hr_resize_x, self.hr_resize_y)

    @property
    def output_size(self) -> tuple[int, int]:
        """The size of the images this request makes: the hires size, the init image's own size when only
        the masked area is inpainted, else width x height."""
        if self.enable_hr:
            return self.hires_size
        if self.init_image is not None and self.mask_image is not None and self.inpaint_full_res:
            return self.init_image.width, self.init_image.height
        return self.width, self.height

    @property
    def missing_images(self) -> list[str]:
        """Image fields that hold only a recorded hash (from a PNG's metadata): the image must be given."""
        missing = [
            name for name in ("init_image", "mask_image") if (image := getattr(self, name)) and image.is_reference
        ]
        missing += [f"controlnets.{index}.image" for index, unit in enumerate(self.controlnets)
                    if unit.image is not None and unit.image.is_reference]  # fmt: skip
        return missing + [f"image_prompts.{index}.image" for index, prompt in enumerate(self.image_prompts)
                          if prompt.image is not None and prompt.image.is_reference]  # fmt: skip

    def image_at(self, name: str) -> InputImage | None:
        """The image a `missing_images` name points at (`init_image`, `controlnets.0.image`)."""
        if name.startswith("controlnets."):
            return self.controlnets[int(name.split(".")[1])].image
        if name.startswith("image_prompts."):
            return self.image_prompts[int(name.split(".")[1])].image
        image: InputImage | None = getattr(self, name)
        return image

    @model_validator(mode="after")
    def _prompt_lora_tags_are_readable(self) -> GenerationRequest:
        _, tagged = split_prompt(self.prompt)  # raises InvalidRequest naming the prompt
        if len(tagged) + len(self.loras) > MAX_LORAS:
            raise ValueError(f"loras: at most {MAX_LORAS} LoRAs per request (field and prompt tags together)")
        return self

    @property
    def all_loras(self) -> list[LoraRef]:
        """The LoRAs to apply: the `loras` field, then the prompt's `<lora:name:weight>` tags."""
        return [*self.loras, *split_prompt(self.prompt)[1]]

    @property
    def encoded_prompt(self) -> str:
        """The prompt as the text encoders see it: without its `<lora:...>` tags (the recorded prompt keeps
        them, as A1111 does)."""
        return split_prompt(self.prompt)[0]

    @property
    def refiner_sampling(self) -> tuple[Sampler, ScheduleType]:
        """The refiner's sampler and schedule type: its own fields, else the base's."""
        return self.refiner_sampler or self.sampler, self.refiner_scheduler or self.scheduler

    @model_validator(mode="after")
    def _refiner_schedule_fits_the_training_schedule(self) -> GenerationRequest:
        # Sequential refining runs refiner_steps over a schedule of refiner_steps / refiner_strength steps.
        if self.use_refinement and self.mode is Mode.SEQUENTIAL:
            schedule = self.refiner_steps / self.refiner_strength
            if schedule > MAX_SCHEDULE:
                raise ValueError(f"refiner_strength: {self.refiner_strength:g} with refiner_steps={self.refiner_steps} "
                                 f"needs a schedule of {schedule:.3g} steps; at most {MAX_SCHEDULE} (the model's "
                                 f"training timesteps)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _every_pass_has_a_step(self) -> GenerationRequest:
        require_both_stages(self, plan_steps(self))
        return self

    @classmethod
    def default(cls, name: str) -> Any:
        """The declared default of field `name` (the one place it is written)."""
        return cls.model_fields[name].default

    def inactive_fields(self) -> set[str]:
        """Fields without effect on this request, left out of the PNG's `parameters` text: those its
        mode ignores, a clip skip of 1 (the model's own layer; A1111 writes Clip skip only above 1), and
        refiner samplers left to the base's."""
        inactive = {"clip_skip"} if self.clip_skip == 1 else set()
        inactive |= self._inactive_edit_fields()
        inactive |= {name for name in ("refiner_sampler", "refiner_scheduler") if getattr(self, name) is None}
        inactive |= {"guidance_rescale"} if self.guidance_rescale is None else set()
        if not self.use_refinement:
            return inactive | {"refiner_steps", "refiner_strength", "mode", "switch_at", "aesthetic_score",
                               "negative_aesthetic_score", "refiner_sampler", "refiner_scheduler"}  # fmt: skip
        if self.mode is Mode.HANDOFF:
            return inactive | {"refiner_steps", "refiner_strength"}
        return inactive | {"switch_at"}

    def _inactive_edit_fields(self) -> set[str]:
        inactive = set() if self.init_image is not None or self.enable_hr else {"strength"}
        if self.init_image is None or self.resize_mode is ResizeMode.JUST_RESIZE:
            inactive.add("resize_mode")
        masked = self.init_image is not None and self.mask_image is not None
        inactive |= set() if masked else {"mask_blur", "inpainting_fill", "inpaint_full_res"}
        if not (masked and self.inpaint_full_res):
            inactive.add("inpaint_full_res_padding")
        if not (masked and self.mask_invert):
            inactive.add("mask_invert")
        hires = {"enable_hr", "hr_scale", "hr_resize_x", "hr_resize_y", "hr_upscaler", "hr_second_pass_steps"}
        if not self.enable_hr:
            return inactive | hires
        inactive.add("enable_hr")
        inactive.add("hr_scale" if self.hr_resize_x or self.hr_resize_y else "hr_resize_x")
        if not (self.hr_resize_x or self.hr_resize_y):
            inactive.add("hr_resize_y")
        if self.hr_second_pass_steps == 0:
            inactive.add("hr_second_pass_steps")
        return inactive

    def recorded(self) -> dict[str, Any]:
        """The request as results and PNGs record it: JSON, images by hash and size (never their pixels)."""
        return self.model_dump(mode="json", context={"images": "summary"})

    def seeds_or_none(self) -> list[int] | None:
        """The seeds of all `n` images, or None when the seed is left random."""
        if self.seed is None:
            return None
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.n)]


REQUEST_FIELDS: list[FieldSpec] = field_table(GenerationRequest)

_NEGATIVE_LINE = "negative prompt:"


def check_prompt_text(value: str) -> str:
    """A prompt is text a PNG can carry back unchanged: valid Unicode, no control characters but tab and newline,
    and no line that would read back as the `Negative prompt:` line of A1111's parameters text.

    Raises:
        ValueError: naming the character and its place, or the line.
    """
    for position, char in enumerate(value):
        if 0xD800 <= ord(char) <= 0xDFFF:
            raise ValueError(f"must be valid Unicode text: a lone surrogate U+{ord(char):04X} at position {position}")
        if unicodedata.category(char) == "Cc" and char not in "\t\n\r":
            raise ValueError(f"must not contain control characters: U+{ord(char):04X} at position {position}")
    for line in value.replace("\r", "\n").split("\n"):
        if line.lower().startswith(_NEGATIVE_LINE):
            raise ValueError("must not have a line starting with 'Negative prompt:' (in a PNG's parameters it would "
                             "read back as the negative prompt; use the negative prompt field)")  # fmt: skip
    return value


def check_clip_skip(clip_skip: int, layers: int) -> None:
    """Raises: InvalidRequest: `clip_skip` deeper than `layers`, the models' shallowest text encoder."""
    if clip_skip > layers:
        raise InvalidRequest("clip_skip", f"must be at most {layers} for these models (their text encoders have "
                                          f"{layers} layers), not {clip_skip}")  # fmt: skip


def invalid_request_from(error: ValidationError) -> InvalidRequest:
    """Turn pydantic's first validation error into an `InvalidRequest`."""
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"]) or "request"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not first["loc"] and ": " in message:  # a rule across fields names its field in the message
        name, message = message.split(": ", 1)
    if first["type"] == "extra_forbidden":
        message = "is not a known field"
    if name in ("width", "height"):
        message += f"; sizes that work are multiples of 8 from {MIN_SIZE} to {MAX_SIZE}"
    return InvalidRequest(name, message)
