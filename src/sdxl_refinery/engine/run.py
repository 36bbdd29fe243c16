"""The two-stage run: SDXL base into latents, then the refiner, then one VAE decode.

Latents pass straight from base to refiner (no decode and re-encode between
stages). Every image has its own CPU `torch.Generator`, used by the base stage
and then by the refiner stage, so a seed gives the same image on any device.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from ..errors import Cancelled, GenerationFailed, InvalidRequest
from ..loras import LoraFile
from ..request import CancelToken, GenerationRequest, Mode, ProgressCallback
from ..steps import StagePlan, plan_steps, require_both_stages
from .decode import decode_checked, decode_pixels, tiles_if_needed, to_images
from .device import Placement
from .edits import EditPipelines, inpaint_inputs, is_inpainting_unet, masked_image_latents, upscale, vae_dtype_kept
from .image_prep import EditInputs, prepare
from .loader import LoadedPair, pair_modules
from .lora_weights import LoraMismatch, LoraWeights
from .prompts import Conditioning, PromptEncoder
from .recovery import MemoryPlan, NonFinite, all_finite, apply_plan, free_memory, is_out_of_memory, plans_for, upcast
from .schedulers import RunSchedule, make_scheduler
from .tracking import StepTracker

log = logging.getLogger(__name__)
ZERO_SNR_GUIDANCE_RESCALE = 0.7  # "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4


@dataclass
class EngineOutput:
    images: list[Image.Image]
    base_steps: int
    refiner_steps: int
    refined: bool
    refinement_error: str | None
    timings: dict[str, float] = field(default_factory=dict)
    memory_plan: str = "resident"
    recoveries: list[str] = field(default_factory=list)
    decode_tiled: bool = False  # tiled for this run only, because a whole decode did not fit
    interrupted: bool = False  # stopped early by CancelToken.interrupt: the latents as they stood


@dataclass
class _Run:
    """One request's run: what every attempt (fp32 retry, lighter memory plan) needs again."""

    request: GenerationRequest
    plan: StagePlan
    seeds: list[int]
    on_progress: ProgressCallback | None
    cancel: CancelToken | None
    preview_every: int
    recoveries: list[str] = field(default_factory=list)
    edit: EditInputs | None = None  # the prepared pixels of an img2img or inpainting request


def plan_stages(pair: LoadedPair, request: GenerationRequest, base_scheduler: SchedulerMixin) -> StagePlan:
    """The request's step plan under the scheduler the base will run with.

    Raises:
        InvalidRequest: a handoff `switch_at` that leaves one stage no step under this scheduler, or a
            `clip_skip` deeper than these text encoders.
    """
    plan = plan_steps(request, RunSchedule(base_scheduler))
    require_both_stages(request, plan)
    encoders = [pair.base.text_encoder, pair.base.text_encoder_2]
    if request.use_refinement:
        encoders.append(pair.refiner.text_encoder_2)
    layers = min(int(encoder.config.num_hidden_layers) for encoder in encoders)
    if request.clip_skip > layers:
        raise InvalidRequest("clip_skip", f"must be at most {layers} for these models (their text encoders have "
                                          f"{layers} layers), not {request.clip_skip}")  # fmt: skip
    return plan


class TwoStageRunner:
    """Runs requests on one loaded pair; not thread-safe (one caller at a time)."""

    def __init__(self, pair: LoadedPair, placement: Placement, memory_plan: MemoryPlan | None = None) -> None:
        self.pair = pair
        self.placement = placement
        self.edits = EditPipelines(pair)
        # The models' own scheduler configs: every run builds its samplers over them (engine/schedulers.py).
        self._scheduler_configs = (pair.base.scheduler.config, pair.refiner.scheduler.config)
        plans = plans_for(placement.device)
        # index into plans_for(device); only ever moves to lighter plans
        self._plan_index = plans.index(memory_plan) if memory_plan else 0
        if self._plan_index:
            apply_plan((pair.base, pair.refiner), plans[self._plan_index], placement.device)
        base, refiner = pair.base, pair.refiner
        self.base_prompts = PromptEncoder([base.tokenizer, base.tokenizer_2], [base.text_encoder, base.text_encoder_2])
        self.refiner_prompts = PromptEncoder([refiner.tokenizer_2], [refiner.text_encoder_2])
        self.lora_weights = LoraWeights(base)

    def _condition(
        self, encoder: PromptEncoder, pipe: object, request: GenerationRequest, tracker: StepTracker
    ) -> Conditioning:
        zero_negative = bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt", False))
        dtype = self.pair.base.text_encoder_2.dtype
        return encoder.encode(request.encoded_prompt, request.negative_prompt, zero_negative, dtype, request.clip_skip,
                              tracker.check_cancelled)  # fmt: skip

    def run(
        self,
        request: GenerationRequest,
        seeds: list[int],
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
        loras: list[tuple[LoraFile, float]] | None = None,
    ) -> EngineOutput:
        """Run base then refiner for `request`, one image per seed, recovering from faults, with `loras`
        (checked files and their weights) applied to the base model for this run only.

        Raises:
            InvalidRequest: the request cannot be planned, or a LoRA fits no layer (before any work).
            Cancelled: `cancel` was set; raised within one step.
            GenerationFailed: NaN/Inf survived the fp32 retries, or memory ran out under every plan.
        """
        # 1. Plan both stages and read the input images before any model work (bad switch points fail here).
        base_scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
        run = _Run(request, plan_stages(self.pair, request, base_scheduler), seeds, on_progress, cancel, preview_every)
        if is_inpainting_unet(self.pair.base.unet) and request.init_image is None:
            raise InvalidRequest("init_image", "the base model is an inpainting checkpoint (9 input channels): it "
                                               "needs an init_image to paint into")  # fmt: skip
        run.edit = prepare(request) if request.init_image is not None else None
        # 2. The run's LoRAs, loaded (cached) and applied; taken out exactly when the run ends.
        try:
            with self.lora_weights.applied(loras or []):
                return self._run_planned(run)
        except LoraMismatch as error:
            raise InvalidRequest("loras", str(error)) from error

    def _run_planned(self, run: _Run) -> EngineOutput:
        plans = plans_for(self.placement.device)
        # 3. Run under the current memory plan; on out-of-memory, free memory and step to a lighter plan.
        while True:
            memory_plan = plans[self._plan_index]
            last_plan = self._plan_index == len(plans) - 1
            try:
                output = self._run_guarded(run, last_plan)
            except Cancelled:
                raise
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                if last_plan:
                    raise GenerationFailed(f"out of memory under every memory plan (last: {memory_plan.name}): "
                                           f"{error}") from error  # fmt: skip
                free_memory()
                self._plan_index += 1  # kept for later jobs: the next one would run out of memory too
                lighter = plans[self._plan_index]
                run.recoveries.append(f"out of memory under plan {memory_plan.name}; retried under {lighter.name}")
                log.warning("   Out of memory under plan %s (%s); retrying under %s", memory_plan.name, error,
                            lighter.name)  # fmt: skip
                apply_plan((self.pair.base, self.pair.refiner), lighter, self.placement.device)
                continue
            output.memory_plan = memory_plan.name + ("+tiled-vae" if output.decode_tiled else "")
            output.recoveries = run.recoveries
            return output

    def _run_guarded(self, run: _Run, last_plan: bool) -> EngineOutput:
        """One run; if NaN/Inf appears, the same run again with every stage in fp32."""
        try:
            return self._run_once(run, last_plan, fp32=False)
        except NonFinite as fault:
            if self._all_fp32():
                raise GenerationFailed(f"numerical fault: {fault}, with every model already in fp32") from fault
            run.recoveries.append(f"{fault}; stages rerun in fp32")
            log.warning("   %s: running the stages again in fp32", fault)
        try:
            return self._run_once(run, last_plan, fp32=True)
        except NonFinite as fault:
            raise GenerationFailed(f"numerical fault: {fault}, even with every stage in fp32") from fault

    @property
    def memory_plan(self) -> MemoryPlan:
        """The plan the next run starts under."""
        return plans_for(self.placement.device)[self._plan_index]

    def _all_fp32(self) -> bool:
        vaes = (self.pair.base.vae, self.pair.refiner.vae)
        return self.placement.dtype == torch.float32 and all(vae.dtype == torch.float32 for vae in vaes)

    @contextlib.contextmanager
    def _fp32_eager(self) -> Iterator[None]:
        """Every stage in fp32, with the plain UNets: compiled graphs (frozen weights) are for the policy's dtype."""
        base, refiner = self.pair.base, self.pair.refiner
        compiled = base.unet, refiner.unet
        base.unet, refiner.unet = (getattr(unet, "_orig_mod", unet) for unet in compiled)
        try:
            with upcast(*pair_modules(self.pair)):
                yield
        finally:
            base.unet, refiner.unet = compiled

    def _run_once(self, run: _Run, last_plan: bool, fp32: bool) -> EngineOutput:
        request, plan, seeds = run.request, run.plan, run.seeds
        tracker = StepTracker(plan.totals, run.on_progress, run.cancel, run.preview_every)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with self._fp32_eager() if fp32 else contextlib.nullcontext():
            # 1. Stage 1: the base, into latents.
            with vae_dtype_kept(self.pair.base.vae):
                latents = self._run_base(request, plan, generators, tracker, timings, run.edit)
            if not all_finite(latents):
                raise NonFinite("NaN/Inf in the base stage's latents")

            # 2. Stage 2: the refiner on those latents, or the documented fallback.
            refined, refinement_error = False, None
            if not request.use_refinement:
                log.info("   Refinement: DISABLED (use_refinement=False): stage 2 skipped")
            elif tracker.interrupted:
                log.info("   Interrupted after %d base steps: stage 2 skipped, keeping the image as it stands",
                         tracker.executed[1])  # fmt: skip
            else:
                try:
                    with vae_dtype_kept(self.pair.refiner.vae):
                        latents_2 = self._run_refiner(request, plan, latents, generators, tracker, timings, run.edit)
                    if not all_finite(latents_2):
                        raise NonFinite("NaN/Inf in the refiner stage's latents")
                    latents, refined = latents_2, not tracker.interrupted
                except Cancelled:
                    raise
                except Exception as error:  # refiner faults fall back to the base image, reported, never silent
                    if (isinstance(error, NonFinite) and not fp32) or (is_out_of_memory(error) and not last_plan):
                        raise  # a retry in fp32, or under a lighter memory plan, may still refine it
                    refinement_error = f"{type(error).__name__}: {error}"
                    log.warning("   Stage 2 failed, keeping the base image (refined=False): %s", refinement_error)
                    latents = self._finish_without_refiner(request, plan, latents, generators, tracker, run.edit)

            # 3. One VAE decode for the batch, again in fp32 if it gives NaN/Inf.
            tracker.check_cancelled()
            decode_started = time.perf_counter()
            # The last stage's own VAE decodes (the refiner's, when it has one of its own and refined).
            vae = self.pair.refiner.vae if refined else self.pair.base.vae
            processor, device = self.pair.base.image_processor, self.placement.device
            with tiles_if_needed(vae, latents, device) as decode_tiled:
                images = decode_checked(vae, processor, latents, device, run.recoveries)
            if run.edit is not None:  # inpainting: back into the original, unmasked pixels unchanged
                images = [run.edit.finish(image) for image in images]
            timings["decode"] = time.perf_counter() - decode_started
        timings["total"] = time.perf_counter() - started
        return EngineOutput(
            images=images,
            base_steps=tracker.executed[1],
            refiner_steps=tracker.executed.get(2, 0) if refined or tracker.interrupted else 0,
            refined=refined,
            refinement_error=refinement_error,
            timings=timings,
            decode_tiled=decode_tiled,
            interrupted=tracker.interrupted,
        )

    def _run_base(
        self,
        request: GenerationRequest,
        plan: StagePlan,
        generators: list[torch.Generator],
        tracker: StepTracker,
        timings: dict[str, float],
        edit: EditInputs | None,
    ) -> torch.Tensor:
        handoff = request.use_refinement and request.mode is Mode.HANDOFF
        log.info("   Stage 1/2: Base generation (%d steps)...", plan.base_steps)
        tracker.begin_stage(1)
        stage_started = time.perf_counter()
        self.pair.base.scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
        conditioning = self._condition(self.base_prompts, self.pair.base, request, tracker)
        common: dict[str, object] = {
            **conditioning.as_kwargs(), "guidance_scale": request.guidance_scale, "num_images_per_prompt": request.n,
            "guidance_rescale": self.guidance_rescale(request),
            "generator": generators, "output_type": "latent", "callback_on_step_end": tracker,
        }  # fmt: skip
        end = request.switch_at if handoff else None
        # 1. Hires fix's first pass: text to image at width x height, then enlarged for the pass below.
        image: object = None
        if request.enable_hr:
            tracker.begin_pass(plan.first_pass_steps)
            first = self.pair.base(**common, width=request.width, height=request.height,
                                   num_inference_steps=request.num_inference_steps).images  # fmt: skip
            if tracker.interrupted:  # kept as it stands: the first pass, at its own size
                timings["base"] = time.perf_counter() - stage_started
                return first
            image = upscale(first, request, self._decode_base)
            log.info("   Hires fix: %dx%d upscaled to %dx%d (%s)", request.width, request.height, *request.hires_size,
                     request.hr_upscaler.value)  # fmt: skip
            tracker.begin_pass(plan.second_pass_steps)
        # 2. The pass that hands over to the refiner: from an image (img2img, inpainting, hires) or from noise.
        latents: torch.Tensor
        mask = self._base_mask(edit)
        if edit is not None and mask is not None:
            pipe = self.edits.base_inpaint()
            pipe.scheduler = self.pair.base.scheduler
            latents = pipe(**common, **inpaint_inputs(self.pair, edit, mask, request, generators), mask_image=mask,
                           width=request.width, height=request.height, strength=request.strength,
                           num_inference_steps=plan.base_schedule, denoising_end=end).images  # fmt: skip
        elif edit is not None or request.enable_hr:
            pipe = self.edits.base_img2img()
            pipe.scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
            latents = pipe(**common, image=edit.init if edit is not None else image, strength=request.strength,
                           num_inference_steps=plan.base_schedule, denoising_end=end).images  # fmt: skip
        else:
            steps = request.num_inference_steps
            latents = self.pair.base(**common, width=request.width, height=request.height, num_inference_steps=steps,
                                     denoising_end=end).images  # fmt: skip
        timings["base"] = time.perf_counter() - stage_started
        log.info("   Stage 1 complete: base latents generated (%d steps, %.1f s)", tracker.executed[1], timings["base"])
        return latents

    def guidance_rescale(self, request: GenerationRequest) -> float:
        """The request's guidance rescale, else the base model's own: 0.7 for a zero-terminal-SNR model (as
        its paper and diffusers recommend), 0 otherwise."""
        if request.guidance_rescale is not None:
            return request.guidance_rescale
        return ZERO_SNR_GUIDANCE_RESCALE if self._scheduler_configs[0].get("rescale_betas_zero_snr") else 0.0

    def _base_mask(self, edit: EditInputs | None) -> Image.Image | None:
        """The base's inpainting mask: the request's; for an inpainting checkpoint without one, all white (the
        whole image redrawn, as A1111 runs such a model for img2img)."""
        if edit is None or edit.mask is not None or not is_inpainting_unet(self.pair.base.unet):
            return None if edit is None else edit.mask
        return Image.new("L", edit.init.size, 255)

    def _decode_base(self, latents: torch.Tensor) -> list[Image.Image]:
        """The base VAE's images of `latents` (hires fix's pixel upscalers)."""
        return to_images(self.pair.base.image_processor, decode_pixels(self.pair.base.vae, latents,
                                                                       self.placement.device))  # fmt: skip

    def _run_refiner(
        self,
        request: GenerationRequest,
        plan: StagePlan,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        tracker: StepTracker,
        timings: dict[str, float],
        edit: EditInputs | None,
    ) -> torch.Tensor:
        log.info("   Stage 2/2: Refinement pass (%d additional steps)...", plan.refiner_steps)
        tracker.begin_stage(2)
        stage_started = time.perf_counter()
        handoff = request.mode is Mode.HANDOFF
        self.pair.refiner.scheduler = make_scheduler(self._scheduler_configs[1], *request.refiner_sampling)
        with self.lora_weights.refiner_view():  # the refiner's prompt, as its own unchanged encoder gives it
            conditioning = self._condition(self.refiner_prompts, self.pair.refiner, request, tracker)
        # An inpainting request is refined by the inpainting pipeline: stage 2 repaints the masked area only.
        masked = edit is not None and edit.mask is not None
        pipe = self.edits.refiner_inpaint() if masked else self.pair.refiner
        pipe.scheduler = self.pair.refiner.scheduler
        extra = {"mask_image": edit.mask, "width": request.width, "height": request.height} if masked and edit else {}
        refined: torch.Tensor = pipe(
            **conditioning.as_kwargs(),
            **extra,
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
        plan: StagePlan,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        tracker: StepTracker,
        edit: EditInputs | None,
    ) -> torch.Tensor:
        """After a refiner failure: sequential latents are done; handoff ones are finished by the base (through
        its inpainting pipeline when the request has a mask or the base is an inpainting checkpoint)."""
        if request.mode is Mode.SEQUENTIAL:
            return latents
        mask = self._base_mask(edit)
        extra: dict[str, object] = {}
        if edit is not None and mask is not None:
            pipe: Any = self.edits.base_inpaint()
            extra = {"mask_image": mask, "width": request.width, "height": request.height}
            if is_inpainting_unet(self.pair.base.unet):
                extra["masked_image_latents"] = masked_image_latents(self.pair, edit.init, mask)
        else:
            pipe = self.edits.base_img2img()
        tracker.begin_stage(2)
        pipe.scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
        conditioning = self._condition(self.base_prompts, self.pair.base, request, tracker)
        finished: torch.Tensor = pipe(
            **extra,
            **conditioning.as_kwargs(),
            num_images_per_prompt=request.n,
            image=latents,
            num_inference_steps=plan.base_schedule,
            denoising_start=request.switch_at,
            guidance_scale=request.guidance_scale,
            guidance_rescale=self.guidance_rescale(request),
            generator=generators,
            output_type="latent",
            callback_on_step_end=tracker,
        ).images
        return finished
