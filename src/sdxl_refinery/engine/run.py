"""The two-stage run: SDXL base into latents, then the refiner, then one VAE decode.

Latents pass straight from base to refiner (no decode and re-encode between
stages). Every image has its own CPU `torch.Generator`, used by the base stage
and then by the refiner stage, so a seed gives the same image on any device.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image

from ..errors import Cancelled, InvalidRequest
from ..request import CancelToken, GenerationRequest, Mode, ProgressCallback
from .device import Placement
from .loader import LoadedPair
from .prompts import Conditioning, PromptEncoder
from .tracking import StepTracker

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """What each stage will execute, computed before any model work.

    Attributes:
        base_steps: denoising steps the base executes.
        refiner_steps: denoising steps the refiner executes (0 without refinement).
        refiner_schedule: `num_inference_steps` handed to the refiner pipeline.
        refiner_strength: img2img strength handed to the refiner (sequential mode).
    """

    base_steps: int
    refiner_steps: int
    refiner_schedule: int
    refiner_strength: float | None


@dataclass
class EngineOutput:
    images: list[Image.Image]
    base_steps: int
    refiner_steps: int
    refined: bool
    refinement_error: str | None
    timings: dict[str, float] = field(default_factory=dict)


def _handoff_split(pair: LoadedPair, steps: int, switch_at: float) -> int:
    """Steps the base runs before `switch_at`, by diffusers' own cutoff rule."""
    scheduler = type(pair.base.scheduler).from_config(pair.base.scheduler.config)
    scheduler.set_timesteps(steps)
    total = scheduler.config.num_train_timesteps
    cutoff = round(total - switch_at * total)  # the same float expression as diffusers
    return int((scheduler.timesteps >= cutoff).sum().item())


def _sequential_strength(refiner_steps: int, strength: float) -> tuple[int, float]:
    """The refiner's schedule length and an img2img strength that executes exactly `refiner_steps`.

    diffusers runs `int(schedule * strength)` steps; floating point can make that
    one short (29.999...), so the strength is nudged up to the smallest value
    that yields the requested count. It moves by less than 1e-12.
    """
    schedule = max(round(refiner_steps / strength), refiner_steps)
    effective = refiner_steps / schedule
    while int(schedule * effective) < refiner_steps:
        effective = math.nextafter(effective, 2.0)
    return schedule, min(effective, 1.0)


def plan_stages(pair: LoadedPair, request: GenerationRequest) -> StagePlan:
    """Work out each stage's step count before running anything.

    Raises:
        InvalidRequest: a handoff `switch_at` that leaves one stage no step.
    """
    steps = request.num_inference_steps
    if not request.use_refinement:
        return StagePlan(steps, 0, 0, None)
    if request.mode is Mode.SEQUENTIAL:
        schedule, strength = _sequential_strength(request.refiner_steps, request.refiner_strength)
        return StagePlan(steps, request.refiner_steps, schedule, strength)
    base_steps = _handoff_split(pair, steps, request.switch_at)
    if base_steps in (0, steps):
        raise InvalidRequest(
            "switch_at",
            f"{request.switch_at} leaves the {'base' if base_steps == 0 else 'refiner'} no step "
            f"out of num_inference_steps={steps}",
        )
    return StagePlan(base_steps, steps - base_steps, steps, None)


class TwoStageRunner:
    """Runs requests on one loaded pair; not thread-safe (one caller at a time)."""

    def __init__(self, pair: LoadedPair, placement: Placement) -> None:
        self.pair = pair
        self.placement = placement
        self._base_as_img2img: StableDiffusionXLImg2ImgPipeline | None = None
        base, refiner = pair.base, pair.refiner
        self.base_prompts = PromptEncoder([base.tokenizer, base.tokenizer_2], [base.text_encoder, base.text_encoder_2])
        self.refiner_prompts = PromptEncoder([refiner.tokenizer_2], [refiner.text_encoder_2])

    def _condition(self, encoder: PromptEncoder, pipe: object, request: GenerationRequest) -> Conditioning:
        zero_negative = bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt", False))
        dtype = self.pair.base.text_encoder_2.dtype
        return encoder.encode(request.prompt, request.negative_prompt, zero_negative, dtype)

    def run(
        self,
        request: GenerationRequest,
        seeds: list[int],
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
    ) -> EngineOutput:
        """Run base then refiner for `request`, one image per seed.

        Raises:
            InvalidRequest: the request cannot be planned (before any work).
            Cancelled: `cancel` was set; raised within one step.
        """
        # 1. Plan both stages and seed one generator per image.
        plan = plan_stages(self.pair, request)
        tracker = StepTracker({1: plan.base_steps, 2: plan.refiner_steps}, on_progress, cancel, preview_every)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        timings: dict[str, float] = {}
        started = time.perf_counter()

        # 2. Stage 1: the base, into latents.
        latents = self._run_base(request, plan, generators, tracker, timings)

        # 3. Stage 2: the refiner on those latents, or the documented fallback.
        refined, refinement_error = False, None
        if not request.use_refinement:
            log.info("   Refinement: DISABLED (use_refinement=False): stage 2 skipped")
        else:
            try:
                latents = self._run_refiner(request, plan, latents, generators, tracker, timings)
                refined = True
            except Cancelled:
                raise
            except Exception as error:  # noqa: BLE001 - any refiner fault falls back, reported, never silent
                refinement_error = f"{type(error).__name__}: {error}"
                log.warning("   Stage 2 failed, keeping the base image (refined=False): %s", refinement_error)
                latents = self._finish_without_refiner(request, latents, generators, tracker)

        # 4. One VAE decode for the batch.
        tracker.check_cancelled()
        decode_started = time.perf_counter()
        images = self.decode(latents)
        timings["decode"] = time.perf_counter() - decode_started
        timings["total"] = time.perf_counter() - started
        return EngineOutput(
            images=images,
            base_steps=tracker.executed[1],
            refiner_steps=tracker.executed.get(2, 0) if refined else 0,
            refined=refined,
            refinement_error=refinement_error,
            timings=timings,
        )

    def _run_base(
        self,
        request: GenerationRequest,
        plan: StagePlan,
        generators: list[torch.Generator],
        tracker: StepTracker,
        timings: dict[str, float],
    ) -> torch.Tensor:
        handoff = request.use_refinement and request.mode is Mode.HANDOFF
        log.info("   Stage 1/2: Base generation (%d steps)...", plan.base_steps)
        tracker.begin_stage(1)
        stage_started = time.perf_counter()
        conditioning = self._condition(self.base_prompts, self.pair.base, request)
        latents: torch.Tensor = self.pair.base(
            **conditioning.as_kwargs(),
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            denoising_end=request.switch_at if handoff else None,
            guidance_scale=request.guidance_scale,
            num_images_per_prompt=request.n,
            generator=generators,
            output_type="latent",
            callback_on_step_end=tracker,
        ).images
        timings["base"] = time.perf_counter() - stage_started
        log.info("   Stage 1 complete: base latents generated (%d steps, %.1f s)", tracker.executed[1], timings["base"])
        return latents

    def _run_refiner(
        self,
        request: GenerationRequest,
        plan: StagePlan,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        tracker: StepTracker,
        timings: dict[str, float],
    ) -> torch.Tensor:
        log.info("   Stage 2/2: Refinement pass (%d additional steps)...", plan.refiner_steps)
        tracker.begin_stage(2)
        stage_started = time.perf_counter()
        handoff = request.mode is Mode.HANDOFF
        conditioning = self._condition(self.refiner_prompts, self.pair.refiner, request)
        refined: torch.Tensor = self.pair.refiner(
            **conditioning.as_kwargs(),
            num_images_per_prompt=request.n,
            image=latents,
            strength=plan.refiner_strength if plan.refiner_strength is not None else 0.3,
            num_inference_steps=plan.refiner_schedule,
            denoising_start=request.switch_at if handoff else None,
            guidance_scale=request.guidance_scale,
            aesthetic_score=request.aesthetic_score,
            negative_aesthetic_score=request.negative_aesthetic_score,
            generator=generators,
            output_type="latent",
            callback_on_step_end=tracker,
        ).images
        timings["refiner"] = time.perf_counter() - stage_started
        log.info("   Stage 2 complete: refinement applied (%d steps, %.1f s)", tracker.executed[2], timings["refiner"])
        return refined

    def _finish_without_refiner(
        self,
        request: GenerationRequest,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        tracker: StepTracker,
    ) -> torch.Tensor:
        """After a refiner failure: sequential latents are done; handoff ones are finished by the base."""
        if request.mode is Mode.SEQUENTIAL:
            return latents
        if self._base_as_img2img is None:
            self._base_as_img2img = StableDiffusionXLImg2ImgPipeline(
                **{k: v for k, v in self.pair.base.components.items() if k in _IMG2IMG_COMPONENTS},
                requires_aesthetics_score=False,
            )
            self._base_as_img2img.set_progress_bar_config(disable=True)
        tracker.begin_stage(2)
        conditioning = self._condition(self.base_prompts, self.pair.base, request)
        finished: torch.Tensor = self._base_as_img2img(
            **conditioning.as_kwargs(),
            num_images_per_prompt=request.n,
            image=latents,
            num_inference_steps=request.num_inference_steps,
            denoising_start=request.switch_at,
            guidance_scale=request.guidance_scale,
            generator=generators,
            output_type="latent",
            callback_on_step_end=tracker,
        ).images
        return finished

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Decode latents with the VAE in its own dtype (fp32 on CUDA) into PIL images."""
        vae = self.pair.base.vae
        latents = latents.to(self.placement.device, self.placement.vae_dtype)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        pixels = vae.decode(latents, return_dict=False)[0]
        images: list[Image.Image] = self.pair.base.image_processor.postprocess(pixels.float(), output_type="pil")
        return images


_IMG2IMG_COMPONENTS = {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler"}
