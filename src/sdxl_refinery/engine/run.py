"""The two-stage run: SDXL base into latents, then the refiner, then one VAE decode.

Latents pass straight from base to refiner (no decode and re-encode between
stages). Every image has its own CPU `torch.Generator`, used by the base stage
and then by the refiner stage, so a seed gives the same image on any device,
alone or in a batch. A run holds one or more requests of one batch key
(batching.py); those whose prompts encode to the same length share each
pipeline call, and each keeps its own progress, cancellation and outcome.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from ..batching import Run, RunItem
from ..errors import Cancelled, GenerationFailed, InvalidRequest, RefineryError
from ..request import GenerationRequest, Mode, check_clip_skip
from ..steps import StagePlan, plan_steps, require_both_stages
from .control import ControlNets
from .decode import decode_pass, decode_pixels, to_images
from .device import Placement
from .edits import EditPipelines, inpaint_inputs, is_inpainting_unet, masked_image_latents, upscale, vae_dtype_kept
from .embedding_vectors import EmbeddingMismatch, embeddings_applied
from .image_prep import EditInputs
from .image_prompts import ImageEncoders, ip_adapters_applied
from .loader import LoadedPair, pair_modules
from .lora_weights import LoraMismatch, LoraWeights
from .passes import EngineOutput, Outcome, Pass, solo_pass
from .prompts import Conditioning, PromptEncoder
from .recovery import MemoryPlan, NonFinite, all_finite, apply_plan, free_memory, is_out_of_memory, plans_for, upcast
from .schedulers import RunSchedule, make_scheduler
from .tracking import BatchTracker

log = logging.getLogger(__name__)
ZERO_SNR_GUIDANCE_RESCALE = 0.7  # "Common Diffusion Noise Schedules and Sample Steps are Flawed", section 3.4


def plan_stages(pair: LoadedPair, request: GenerationRequest, base_scheduler: SchedulerMixin) -> StagePlan:
    """The request's step plan under the scheduler the base will run with.

    Raises:
        InvalidRequest: a handoff `switch_at` that leaves one stage no step under this scheduler, or a
            `clip_skip` deeper than these text encoders.
    """
    plan = plan_steps(request, RunSchedule(base_scheduler))
    require_both_stages(request, plan)
    check_clip_skip(request.clip_skip, encoder_layers(pair, request.use_refinement))
    return plan


def encoder_layers(pair: LoadedPair, refined: bool = True) -> int:
    """Layers of the shallowest text encoder a request runs through (`refined`: the refiner's too): the deepest
    `clip_skip` these models take."""
    encoders = [pair.base.text_encoder, pair.base.text_encoder_2]
    if refined:
        encoders.append(pair.refiner.text_encoder_2)
    return min(int(encoder.config.num_hidden_layers) for encoder in encoders)


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
        self.controlnets = ControlNets(placement.device, placement.dtype, base.unet.config)
        self.image_encoders = ImageEncoders()

    def _condition(self, encoder: PromptEncoder, pipe: object, request: GenerationRequest,
                   tracker: BatchTracker) -> Conditioning:  # fmt: skip
        zero_negative = bool(getattr(pipe, "config", {}).get("force_zeros_for_empty_prompt", False))
        dtype = self.pair.base.text_encoder_2.dtype
        return encoder.encode(request.encoded_prompt, request.negative_prompt, zero_negative, dtype, request.clip_skip,
                              tracker.check_cancelled)  # fmt: skip

    def _prompts(self, encoder: PromptEncoder, pipe: object, run: Pass, tracker: BatchTracker) -> dict[str, object]:
        """The pass's prompt arguments: one request's encoding with `num_images_per_prompt` (as diffusers is
        driven for one request), or every request's encoding repeated for each of its images."""
        encoded = [self._condition(encoder, pipe, item.request, tracker) for item in run.items]
        if run.solo:
            return {**encoded[0].as_kwargs(), "num_images_per_prompt": run.request.n}
        return {**Conditioning.stacked(encoded, run.counts).as_kwargs(), "num_images_per_prompt": 1}

    def run(self, run: Run) -> list[Outcome]:
        """Run base then refiner for every request of `run` in shared passes, one image per seed, recovering
        from faults, with the run's LoRAs (checked files and their weights) applied to the base model for this
        run only.

        Returns:
            One outcome per request, in order: its output, `Cancelled` when its token was cancelled (the others
            go on), or the error that failed it alone.

        Raises:
            InvalidRequest: the run cannot be planned, or a LoRA fits no layer (before any work).
            Cancelled: a run of one request was cancelled; raised within one step.
            GenerationFailed: a run of one request: NaN/Inf survived the fp32 retries, or memory ran out under
                every plan.
        """
        # 1. Plan both stages before any model work (bad switch points fail here); every request's plan is equal.
        request = run.items[0].request
        plan = plan_stages(self.pair, request, make_scheduler(self._scheduler_configs[0], request.sampler,
                                                              request.scheduler))  # fmt: skip
        if is_inpainting_unet(self.pair.base.unet) and request.init_image is None:
            raise InvalidRequest("init_image", "the base model is an inpainting checkpoint (9 input channels): it "
                                               "needs an init_image to paint into")  # fmt: skip
        # 2. The run's LoRAs (loaded, cached) and embeddings, applied; taken out exactly when the run ends.
        prompt_encoders = [self.base_prompts, self.refiner_prompts]
        try:
            with self.lora_weights.applied(run.loras), embeddings_applied(prompt_encoders, run.embeddings):
                return self._run_passes(run, plan)
        except LoraMismatch as error:
            raise InvalidRequest("loras", str(error)) from error
        except EmbeddingMismatch as error:
            raise InvalidRequest("prompt", str(error)) from error

    def _run_passes(self, run: Run, plan: StagePlan) -> list[Outcome]:
        """Requests whose prompts encode to the same length share a pass (a longer prompt's extra 77-token
        chunks would change a shorter one's image); each pass that fails is run again request by request, so a
        request that fails (NaN/Inf, a refiner fault, memory) fails alone."""
        outcomes: dict[int, Outcome] = {}
        for indices in self._groups(run.items):
            items = [run.items[index] for index in indices]
            if len(run.items) == 1:  # one request: its errors are the run's, raised as always
                outputs: list[Outcome] = self._run_planned(solo_pass(items[0], plan))
            elif len(items) == 1:
                outputs = [self._run_alone(items[0], plan)]
            else:
                try:
                    outputs = self._run_planned(Pass(items, plan))
                except Cancelled:
                    outputs = [Cancelled("cancelled by request")] * len(items)
                except Exception as error:  # noqa: BLE001  # rerun apart: the fault stays with its own request
                    log.warning("   A batch of %d requests failed (%s: %s); running each alone", len(items),
                                type(error).__name__, error)  # fmt: skip
                    outputs = [self._run_alone(item, plan) for item in items]
            outcomes.update(zip(indices, outputs, strict=True))
        return [outcomes[index] for index in range(len(run.items))]

    def _run_alone(self, item: RunItem, plan: StagePlan) -> Outcome:
        try:
            return self._run_planned(solo_pass(item, plan))[0]
        except RefineryError as error:
            return error
        except Exception as error:  # noqa: BLE001  # this request's failure, not the batch's
            return GenerationFailed(f"{type(error).__name__}: {error}")

    def _groups(self, items: list[RunItem]) -> list[list[int]]:
        """Indices of the requests that can share a pass: their prompts need as many 77-token chunks."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, item in enumerate(items):
            texts = (item.request.encoded_prompt, item.request.negative_prompt)
            key = tuple(encoder.chunk_count(text) for encoder in (self.base_prompts, self.refiner_prompts)
                        for text in texts) if len(items) > 1 else ()  # fmt: skip
            groups.setdefault(key, []).append(index)
        return list(groups.values())

    def _run_planned(self, run: Pass) -> list[Outcome]:
        plans = plans_for(self.placement.device)
        # 3. Run under the current memory plan; on out-of-memory, free memory and step to a lighter plan.
        while True:
            memory_plan = plans[self._plan_index]
            last_plan = self._plan_index == len(plans) - 1
            try:
                outcomes = self._run_guarded(run, last_plan)
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
            for output in outcomes:
                if isinstance(output, EngineOutput):
                    output.memory_plan = memory_plan.name + ("+tiled-vae" if output.decode_tiled else "")
                    output.recoveries = list(run.recoveries)
            return outcomes

    def _run_guarded(self, run: Pass, last_plan: bool) -> list[Outcome]:
        """One run; if NaN/Inf appears, the same run again with every stage in fp32 (a shared pass is not
        retried: its requests are run again apart, so that only the faulty one pays for fp32)."""
        try:
            return self._run_once(run, last_plan, fp32=False)
        except NonFinite as fault:
            if not run.solo:
                raise
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

    def _run_once(self, run: Pass, last_plan: bool, fp32: bool) -> list[Outcome]:
        request = run.request
        tracker = run.tracker()
        generators = run.generators()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with self._fp32_eager() if fp32 else contextlib.nullcontext():
            # 1. Stage 1: the base, into latents.
            with vae_dtype_kept(self.pair.base.vae):
                weights = [prompt.weight for prompt in run.request.image_prompts]  # IP-Adapters: the base's pass only
                with (
                    ip_adapters_applied(self.pair.base, run.items[0].image_prompt_files, weights, self.image_encoders),
                    self.controlnets.for_pass(),  # the units' control modes: this pass only
                ):
                    latents = self._run_base(run, generators, tracker, timings)
            if not all_finite(latents):
                raise NonFinite("NaN/Inf in the base stage's latents")
            tracker.settle(latents)  # a request interrupted now keeps its base latents

            # 2. Stage 2: the refiner on those latents, or the documented fallback.
            refined, refinement_error = False, None
            if not request.use_refinement:
                log.info("   Refinement: DISABLED (use_refinement=False): stage 2 skipped")
            elif tracker.interrupted:
                log.info("   Interrupted in the base stage: stage 2 skipped, keeping the images as they stand")
            else:
                try:
                    with vae_dtype_kept(self.pair.refiner.vae):
                        latents_2 = self._run_refiner(run, latents, generators, tracker, timings)
                    if not all_finite(latents_2):
                        raise NonFinite("NaN/Inf in the refiner stage's latents")
                    latents, refined = latents_2, True
                except Cancelled:
                    raise
                except Exception as error:  # refiner faults fall back to the base image, reported, never silent
                    if not run.solo or (isinstance(error, NonFinite) and not fp32) or (
                            is_out_of_memory(error) and not last_plan):  # fmt: skip
                        raise  # a retry in fp32, under a lighter memory plan, or apart may still refine it
                    refinement_error = f"{type(error).__name__}: {error}"
                    log.warning("   Stage 2 failed, keeping the base image (refined=False): %s", refinement_error)
                    latents = self._finish_without_refiner(run, latents, generators, tracker)

            # 3. One VAE decode for the images that ran to the end, again in fp32 if it gives NaN/Inf.
            tracker.check_cancelled()
            decode_started = time.perf_counter()
            # The last stage's own VAE decodes (the refiner's, when it has one and refined).
            vae = self.pair.refiner.vae if refined else self.pair.base.vae
            images, decode_tiled = decode_pass(run, tracker, latents, (vae, self.pair.base.vae),
                                               self.pair.base.image_processor, self.placement.device)  # fmt: skip
            timings["decode"] = time.perf_counter() - decode_started
        timings["total"] = time.perf_counter() - started
        outcomes: list[Outcome] = []
        for index, own in enumerate(images):
            steps = tracker.trackers[index]
            if own is None:
                outcomes.append(Cancelled("cancelled by request"))
                continue
            kept = index in tracker.kept or (steps.interrupted and not refined)
            outcomes.append(EngineOutput(
                images=own, base_steps=steps.executed[1],
                refiner_steps=steps.executed.get(2, 0) if refined or kept else 0,
                refined=refined and not kept, refinement_error=refinement_error, timings=dict(timings),
                decode_tiled=decode_tiled, interrupted=kept or steps.interrupted,
            ))  # fmt: skip
        return outcomes

    def _run_base(
        self, run: Pass, generators: list[torch.Generator], tracker: BatchTracker, timings: dict[str, float]
    ) -> torch.Tensor:
        request, plan, edit = run.request, run.plan, run.edit
        handoff = request.use_refinement and request.mode is Mode.HANDOFF
        if not run.solo:
            log.info("   One pass for %d requests (%d images)", len(run.items), len(generators))
        log.info("   Stage 1/2: Base generation (%d steps)...", plan.base_steps)
        tracker.begin_stage(1)
        stage_started = time.perf_counter()
        self.pair.base.scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
        common: dict[str, object] = {
            **self._prompts(self.base_prompts, self.pair.base, run, tracker),
            "guidance_scale": request.guidance_scale, "guidance_rescale": self.guidance_rescale(request),
            "generator": generators, "output_type": "latent", "callback_on_step_end": tracker,
        }  # fmt: skip
        if request.image_prompts:
            references = [prompt.image.open() for prompt in request.image_prompts if prompt.image is not None]
            common["ip_adapter_image"] = references[0] if len(references) == 1 else references
        end = request.switch_at if handoff else None
        # 1. Hires fix's first pass: text to image at width x height, then enlarged for the pass below.
        image: object = None
        if request.enable_hr:
            tracker.begin_pass(plan.first_pass_steps)
            first_control, first_net = self._control(run, common, "image", (request.width, request.height))
            first_pipe = self.edits.base_control("text", first_net) if first_control else self.pair.base
            first_pipe.scheduler = self.pair.base.scheduler
            first = first_pipe(**common, **first_control, width=request.width, height=request.height,
                               num_inference_steps=request.num_inference_steps).images  # fmt: skip
            if tracker.interrupted:  # kept as it stands: the first pass, at its own size
                timings["base"] = time.perf_counter() - stage_started
                return first
            image = upscale(first, request, self._decode_base, run.items[0].hires_enlarge)
            log.info("   Hires fix: %dx%d upscaled to %dx%d (%s)", request.width, request.height, *request.hires_size,
                     request.hr_upscaler)  # fmt: skip
            tracker.begin_pass(plan.second_pass_steps)
        # 2. The pass that hands over to the refiner: from an image (img2img, inpainting, hires) or from noise,
        #    guided by the request's ControlNet units when it has some.
        latents: torch.Tensor
        mask = self._base_mask(edit)
        size = request.hires_size if request.enable_hr else (request.width, request.height)
        map_key = "control_image" if edit is not None or request.enable_hr else "image"
        control, controlnet = self._control(run, common, map_key, size)
        if edit is not None and mask is not None:
            pipe = self.edits.base_control("inpaint", controlnet) if control else self.edits.base_inpaint()
            pipe.scheduler = self.pair.base.scheduler
            inputs = inpaint_inputs(self.pair, edit, mask, request, generators)
            if control and "masked_image_latents" in inputs:
                raise InvalidRequest("controlnets", "not with an inpainting checkpoint's latent fills (diffusers' "
                                                    "ControlNet inpainting pipeline takes pixels only)")  # fmt: skip
            latents = pipe(**common, **inputs, **control, mask_image=mask, width=request.width, height=request.height,
                           strength=request.strength, num_inference_steps=plan.base_schedule,
                           denoising_end=end).images  # fmt: skip
        elif edit is not None or request.enable_hr:
            pipe = self.edits.base_control("img2img", controlnet) if control else self.edits.base_img2img()
            pipe.scheduler = make_scheduler(self._scheduler_configs[0], request.sampler, request.scheduler)
            handover = {} if control else {"denoising_end": end}  # ControlNet img2img: sequential mode only
            latents = pipe(**common, **control, **handover, image=edit.init if edit is not None else image,
                           strength=request.strength, num_inference_steps=plan.base_schedule).images  # fmt: skip
        else:
            pipe = self.edits.base_control("text", controlnet) if control else self.pair.base
            pipe.scheduler = self.pair.base.scheduler
            latents = pipe(**common, **control, width=request.width, height=request.height,
                           num_inference_steps=request.num_inference_steps, denoising_end=end).images  # fmt: skip
        timings["base"] = time.perf_counter() - stage_started
        log.info("   Stage 1 complete: base latents generated (%.1f s)", timings["base"])
        return latents

    def _control(self, run: Pass, common: dict[str, object], map_key: str,
                 size: tuple[int, int]) -> tuple[dict[str, Any], Any]:  # fmt: skip
        """The pipeline's control arguments (maps of `size`) and ControlNet module for the pass's request ({} and
        None without units). diffusers' ControlNet pipelines do not rescale guidance: the common arguments lose
        it, and a model that needs it (zero terminal SNR) is refused."""
        request = run.request
        if not request.controlnets:
            return {}, None
        if common.pop("guidance_rescale", 0.0):
            raise InvalidRequest("controlnets", "this base model samples with guidance rescale (zero terminal SNR), "
                                                "which diffusers' ControlNet pipelines do not apply")  # fmt: skip
        controlnet, arguments = self.controlnets.arguments(
            request.controlnets, run.items[0].control_sources, *size, map_key, guided=request.guidance_scale > 1
        )
        return arguments, controlnet

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
        run: Pass,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        tracker: BatchTracker,
        timings: dict[str, float],
    ) -> torch.Tensor:
        request, plan, edit = run.request, run.plan, run.edit
        log.info("   Stage 2/2: Refinement pass (%d additional steps)...", plan.refiner_steps)
        tracker.begin_stage(2)
        stage_started = time.perf_counter()
        handoff = request.mode is Mode.HANDOFF
        self.pair.refiner.scheduler = make_scheduler(self._scheduler_configs[1], *request.refiner_sampling)
        with self.lora_weights.refiner_view():  # the refiner's prompt, as its own unchanged encoder gives it
            prompts = self._prompts(self.refiner_prompts, self.pair.refiner, run, tracker)
        # An inpainting request is refined by the inpainting pipeline: stage 2 repaints the masked area only.
        masked = edit is not None and edit.mask is not None
        pipe = self.edits.refiner_inpaint() if masked else self.pair.refiner
        pipe.scheduler = self.pair.refiner.scheduler
        extra = {"mask_image": edit.mask, "width": request.width, "height": request.height} if masked and edit else {}
        refined: torch.Tensor = pipe(
            **prompts,
            **extra,
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
        log.info("   Stage 2 complete: refinement applied (%.1f s)", timings["refiner"])
        return refined

    def _finish_without_refiner(
        self, run: Pass, latents: torch.Tensor, generators: list[torch.Generator], tracker: BatchTracker
    ) -> torch.Tensor:
        """After a refiner failure (a run of one request): sequential latents are done; handoff ones are
        finished by the base (through its inpainting pipeline when the request has a mask or the base is an
        inpainting checkpoint)."""
        request, edit = run.request, run.edit
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
        finished: torch.Tensor = pipe(
            **extra,
            **self._prompts(self.base_prompts, self.pair.base, run, tracker),
            image=latents,
            num_inference_steps=run.plan.base_schedule,
            denoising_start=request.switch_at,
            guidance_scale=request.guidance_scale,
            guidance_rescale=self.guidance_rescale(request),
            generator=generators,
            output_type="latent",
            callback_on_step_end=tracker,
        ).images
        return finished
