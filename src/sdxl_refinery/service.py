"""ImageService: the async door to the engine, keeping the documented call.

Work runs on one engine thread per service (one device), so the caller's event
loop never blocks and concurrent calls wait their turn instead of sharing a
pipeline. Models load once, on first use or on `load()`, and stay in memory.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .annotators import AnnotatorFolder
from .batching import BatchCall, Run, batch_key
from .config import Settings
from .controlnets import ControlNetFolder
from .embeddings import EmbeddingFolder
from .engine.catalog import ModelFolder
from .errors import Cancelled, GenerationFailed, InvalidRequest, RefineryError, StorageError
from .ip_adapters import IpAdapterFolder
from .loras import LoraFolder
from .pairs import LoadedPairs
from .png import check_writable_folder
from .prepared import PreparedCall, finish_call
from .request import (
    HIGH_QUALITY_GUIDANCE,
    MAX_SEED,
    STANDARD_GUIDANCE,
    CancelToken,
    GenerationRequest,
    GenerationResult,
    Precision,
    ProgressCallback,
    SpeedOptions,
    validate_device,
    validate_precision,
)
from .service_checks import RequestChecks, check_images
from .upscale_door import UpscaleDoor
from .upscale_request import UpscaleRequest
from .upscale_run import UpscaleResult

if TYPE_CHECKING:
    from .engine.passes import Outcome
    from .engine.upscaling import UpscalerEntry, Upscalers

log = logging.getLogger("sdxl_refinery")


class RunsRequests(Protocol):
    """What the service needs of an engine: `engine.Engine`, or a fake in the tests (tests/fakes.py).

    `placement` has `device`, `precision` (a `Precision`), `precision_name` and `reason`.
    """

    placement: Any

    @property
    def models(self) -> dict[str, str]: ...

    @property
    def optimizations(self) -> list[str]: ...

    def run(self, run: Run) -> list[Outcome]:
        """Render the requests of `run` (one batch key): one outcome per request, in order (its output, or the
        error that failed it alone: `Cancelled` when its own token was cancelled). A run of one request raises
        its errors instead."""
        ...


class ImageService(RequestChecks):
    """Turns prompts into refined SDXL images.

    Args:
        base_model: Hub id, diffusers folder, single .safetensors file or `tiny`; default
            `REFINERY_BASE_MODEL`, else SDXL base 1.0.
        refiner_model: likewise; default `REFINERY_REFINER_MODEL`, else SDXL refiner 1.0.
        device: `auto`, `cpu`, `mps`, `cuda` or `cuda:N`.
        precision: `auto`, `full`, `half` or `bf16`.
        speed: compilation, memory layout, fused projections and CPU threads (default: the
            measured policy for the device, see docs/performance.md).
        engine_factory: makes the engine on first use (default: `Engine.load` with the arguments above);
            server and queue tests pass a fake engine so that they test the server, not diffusion.

    Raises:
        InvalidRequest: unknown device or precision name.
    """

    def __init__(
        self,
        base_model: str | None = None,
        refiner_model: str | None = None,
        device: str = "auto",
        precision: Precision | str = Precision.AUTO,
        speed: SpeedOptions | None = None,
        engine_factory: Callable[..., RunsRequests] | None = None,
        lora_dir: Path | None = None,
        models_dir: Path | None = None,
        max_loaded_pairs: int = 1,
        upscaler_dir: Path | None = None,
        embeddings_dir: Path | None = None,
        controlnet_dir: Path | None = None,
        ip_adapter_dir: Path | None = None,
        annotator_dir: Path | None = None,
    ) -> None:
        if base_model is None or refiner_model is None:
            # Not given: REFINERY_BASE_MODEL / REFINERY_REFINER_MODEL, else SDXL base and refiner 1.0.
            settings = Settings()
            base_model = base_model or settings.base_model
            refiner_model = refiner_model or settings.refiner_model
        self.base_model = base_model
        self.refiner_model = refiner_model
        self.device = validate_device(device)
        self.precision = validate_precision(precision)
        self.speed = speed or SpeedOptions()
        self.lora_folder = LoraFolder(lora_dir)
        self.models_folder = ModelFolder(models_dir)
        self.embedding_folder = EmbeddingFolder(embeddings_dir)
        self.controlnet_folder = ControlNetFolder(controlnet_dir)
        self.ip_adapter_folder = IpAdapterFolder(ip_adapter_dir)
        self.annotator_folder = AnnotatorFolder(annotator_dir)
        self._engine: RunsRequests | None = None  # the engine of the latest run (or load)
        self._pairs = LoadedPairs(max_loaded_pairs, self._room_for, self._released)
        self._engine_factory = engine_factory or self._load_engine
        self.own_models: dict[str, str] = {}  # the service's own pair as last loaded (names, hashes), kept after
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refinery-engine")
        self.upscaling = UpscaleDoor(upscaler_dir, self.device, self._executor)

    @classmethod
    def from_settings(cls, settings: Settings) -> ImageService:
        """Build a service from a `Settings` object (the faces' way)."""
        return cls(settings.base_model, settings.refiner_model, settings.device, settings.precision, settings.speed(),
                   lora_dir=settings.loras_folder(), models_dir=settings.models_folder(),
                   max_loaded_pairs=settings.max_loaded_pairs,
                   upscaler_dir=settings.upscalers_folder(), embeddings_dir=settings.embeddings_folder(),
                   controlnet_dir=settings.controlnets_folder(),
                   ip_adapter_dir=settings.ip_adapters_folder(),
                   annotator_dir=settings.annotators_folder())  # fmt: skip

    # -- loading ---------------------------------------------------------------------------------

    def _load_engine(self, base_model: str | None = None, refiner_model: str | None = None) -> RunsRequests:
        # Imported here so that faces start fast and torch loads only when a model does.
        from .engine import Engine

        return Engine.load(base_model or self.base_model, refiner_model or self.refiner_model, self.device,
                           self.precision, self.speed)  # fmt: skip

    def _engine_sync(self, base_model: str | None = None, refiner_model: str | None = None) -> RunsRequests:
        """The engine of a pair (the service's own when None), loaded on first use within the cache's bounds."""
        key = (base_model or self.base_model, refiner_model or self.refiner_model)
        own = key == (self.base_model, self.refiner_model)
        engine = self._pairs.get(key, lambda: self._engine_factory() if own else self._engine_factory(*key))
        if own:
            self.own_models = dict(engine.models)
        self._engine = engine
        return engine

    def _released(self, engine: RunsRequests) -> None:
        self._engine = None if self._engine is engine else self._engine

    def _room_for(self, pair: tuple[str, str]) -> bool:
        """Whether `pair` fits beside the pairs loaded now (the memory plan's count of free memory)."""
        from .engine.memory import room_for_pair

        try:
            return room_for_pair(*pair, self.device, self.precision.value)
        except RefineryError:  # a reference that does not resolve: the load that follows says so, naming it
            return True

    @property
    def last_switch_seconds(self) -> float:
        """What loading the latest run's pair cost (0 when it was loaded already)."""
        return self._pairs.last_load_seconds

    @property
    def max_loaded_pairs(self) -> int:
        """At most this many (base, refiner) pairs are loaded at once."""
        return self._pairs.limit

    @property
    def loaded_pairs(self) -> list[tuple[str, str]]:
        """The (base, refiner) references loaded now, oldest first."""
        return self._pairs.keys()

    async def load(self) -> None:
        """Load the models now instead of on the first request.

        Raises:
            ModelLoadError: a model cannot be resolved or loaded.
            InvalidRequest: the device is not present on this machine.
        """
        await asyncio.get_running_loop().run_in_executor(self._executor, self._engine_sync)

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def describe(self) -> dict[str, Any]:
        """Device, precision and models of the loaded engine (empty before loading)."""
        if self._engine is None:
            return {}
        placement = self._engine.placement
        return {
            "device": placement.device,
            "precision": placement.precision_name,
            "reason": placement.reason,
            "optimizations": self._engine.optimizations,
            **self._engine.models,
        }

    # -- generation ------------------------------------------------------------------------------

    async def generate(
        self,
        request: GenerationRequest,
        *,
        output_path: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        """Render `request`, waiting for earlier calls on this service to finish first.

        Args:
            request: what to render (already validated on construction).
            output_path: where to write the PNG; a batch writes `stem-1.png`, ...
            on_progress: called from the engine thread after every step.
            cancel: a token; cancelling it stops the run within one step.
            preview_every: attach a preview image to every this-many-th progress report.

        Raises:
            InvalidRequest: a rule spanning fields, the device, or the output folder.
            Cancelled: the token was cancelled or the awaiting task was cancelled.
            StorageError: the PNG could not be written (nothing partial is left).
            ModelLoadError, GenerationFailed: the models could not load or run.
        """
        call = BatchCall(request, output_path, on_progress, cancel or CancelToken(), preview_every)
        (outcome,) = await self.generate_batch([call])
        if isinstance(outcome, RefineryError):
            raise outcome
        assert isinstance(outcome, GenerationResult)
        return outcome

    async def generate_batch(self, calls: list[BatchCall]) -> list[GenerationResult | UpscaleResult | RefineryError]:
        """Render several requests in shared passes, each as it would come out alone (its own seeds, prompt,
        progress, token and PNG), waiting for earlier calls on this service to finish first.

        Args:
            calls: requests whose `batching.batch_key` is equal (not None when there are several).

        Returns:
            One outcome per call, in order: its result, or the error that failed it alone (`Cancelled` when its
            token was cancelled; the other calls go on).

        Raises:
            InvalidRequest: field `requests`: the calls' requests cannot share a pass.
        """
        if isinstance(calls[0].request, UpscaleRequest):
            if len(calls) > 1:
                raise InvalidRequest("requests", "an upscale runs alone, not in a batch")
            return [await self._upscale_call(calls[0])]
        keys = {batch_key(call.request) for call in calls}
        if len(calls) > 1 and (len(keys) > 1 or None in keys):
            raise InvalidRequest("requests", "a batch's requests must differ only in prompt, negative_prompt, seed "
                                             "and n, and start from no image")  # fmt: skip
        checked: list[PreparedCall | RefineryError] = []
        for call in calls:
            try:
                checked.append(self._prepare(call))
            except RefineryError as error:
                checked.append(error)
        ready = [entry for entry in checked if isinstance(entry, PreparedCall)]
        done: list[GenerationResult | RefineryError] = []
        if ready:
            loop = asyncio.get_running_loop()
            work = loop.run_in_executor(self._executor, self._generate_sync, ready)
            try:
                done = await asyncio.shield(work)
            except asyncio.CancelledError:
                for entry in ready:
                    entry.call.cancel.cancel()  # the engine thread stops at its next step
                raise
        results: Iterator[GenerationResult | UpscaleResult | RefineryError] = iter(done)
        return [entry if isinstance(entry, RefineryError) else next(results) for entry in checked]

    def _prepare(self, call: BatchCall) -> PreparedCall:
        """Raises: InvalidRequest: the output folder, an image given only by its hash, a model or a LoRA."""
        request = call.request
        assert isinstance(request, GenerationRequest)  # upscales go to `_upscale_call`
        if call.output_path is not None:
            check_writable_folder(Path(call.output_path))
        check_images(request)
        self.check_upscalers(request)
        models = self.resolve_models(request, call.allow_paths)
        loras = self.check_loras(request, call.allow_paths)
        seeds = request.seeds_or_none() or [secrets.randbelow(MAX_SEED + 1) for _ in range(request.n)]
        embeddings = self.embedding_folder.used_by(request.encoded_prompt, request.negative_prompt)
        controls = self.check_controlnets(request)
        adapters = self.check_image_prompts(request)
        return PreparedCall(call, seeds, models, loras, self.upscaling.hires_enlarge(request), embeddings, controls,
                            adapters)  # fmt: skip

    def _generate_sync(self, ready: list[PreparedCall]) -> list[GenerationResult | RefineryError]:
        """On the engine thread: one engine run for the calls not yet cancelled, then each call's result."""
        outcomes: list[Outcome | None] = [Cancelled("cancelled by request") if entry.call.cancel.cancelled else None
                                          for entry in ready]  # fmt: skip
        live = [entry for entry, outcome in zip(ready, outcomes, strict=True) if outcome is None]
        if not live:
            if len(ready) == 1:
                ready[0].call.cancel.raise_if_cancelled()
            return [Cancelled("cancelled by request") for _ in ready]
        engine = self._engine_sync(*live[0].models)
        switched = self.last_switch_seconds
        for entry in live:
            self._log_plan(entry.item().request, engine)
        try:
            embeddings = list({e.name: e for entry in live for e in entry.embeddings}.values())
            ran = iter(engine.run(Run([entry.item() for entry in live], live[0].loras, embeddings)))
        except RefineryError as error:
            if len(ready) == 1:
                raise
            ran = iter([error] * len(live))
        except Exception as error:
            failed = GenerationFailed(f"{type(error).__name__}: {error}")
            if len(ready) == 1:
                raise failed from error
            ran = iter([failed] * len(live))
        results: list[GenerationResult | RefineryError] = []
        for entry, outcome in zip(ready, outcomes, strict=True):
            own = outcome if outcome is not None else next(ran)
            if isinstance(own, RefineryError):
                results.append(own)
                continue
            if switched:  # this run loaded its pair: what switching cost, reported with the stages
                own.timings["load"] = switched
            try:
                results.append(finish_call(entry, own, engine))
            except (Cancelled, StorageError) as error:
                results.append(error)
        return results

    # -- upscaling -------------------------------------------------------------------------------

    @property
    def upscalers(self) -> Upscalers:
        """The upscaler folder on this service's device (torch loads on first use)."""
        return self.upscaling.upscalers

    def upscaler_entries(self) -> list[UpscalerEntry]:
        """Every file of the upscaler folder: name, architecture and factor, or why it cannot be used."""
        return self.upscaling.upscalers.entries()

    async def upscale(
        self,
        request: UpscaleRequest,
        *,
        output_path: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> UpscaleResult:
        """Enlarge the request's images, waiting for earlier calls on this service to finish first.

        Args:
            output_path: where to write the PNG; several images write `stem-1.png`, ...
            on_progress: called from the engine thread after every tile (stage 3).
            cancel: a token; cancelling it stops the run before the next tile.

        Raises:
            InvalidRequest: an unknown or unusable upscaler, an image given only by its hash, the output folder.
            Cancelled, StorageError: as `generate`.
        """
        outcome = await self._upscale_call(BatchCall(request, output_path, on_progress, cancel or CancelToken()))
        if isinstance(outcome, RefineryError):
            raise outcome
        return outcome

    async def _upscale_call(self, call: BatchCall) -> UpscaleResult | RefineryError:
        try:
            check_images(call.request)
        except RefineryError as error:
            return error
        return await self.upscaling.run(call)

    def _log_plan(self, request: GenerationRequest, engine: RunsRequests) -> None:
        quality = "HIGH QUALITY" if request.guidance_scale >= HIGH_QUALITY_GUIDANCE else "STANDARD"
        log.info("Generating image for prompt: %r", request.prompt[:200])
        log.info(
            "   Mode: %s (base steps=%d, guidance=%s)", quality, request.num_inference_steps, request.guidance_scale
        )
        if request.use_refinement:
            log.info("   Refinement: ENABLED (%s, refiner steps=%d)", request.mode.value, request.refiner_steps)
        else:
            log.info("   Refinement: DISABLED (use_refinement=False)")
        device = engine.placement.device
        note = " - Note: CPU refinement will take longer" if device == "cpu" else ""
        log.info("   Device: %s (%s)%s", device.upper(), engine.placement.precision_name, note)

    async def generate_image(
        self,
        prompt: str,
        output_path: str | Path,
        num_inference_steps: int = 50,
        high_quality: bool = True,
        use_refinement: bool = True,
        **fields: Any,
    ) -> bool:
        """The documented call: render `prompt` to `output_path`; True on success.

        `high_quality=True` means guidance 8.0, False means 7.5; an explicit
        `guidance_scale` wins. Every other `GenerationRequest` field may be passed
        by keyword. Failures (bad input included) are logged and return False.
        """
        fields.setdefault("guidance_scale", HIGH_QUALITY_GUIDANCE if high_quality else STANDARD_GUIDANCE)
        try:
            request = GenerationRequest(
                prompt=prompt, num_inference_steps=num_inference_steps, use_refinement=use_refinement, **fields
            )
            await self.generate(request, output_path=output_path)
        except RefineryError as error:
            log.error("Image generation failed: %s", error)
            return False
        except Exception:
            log.exception("Image generation failed unexpectedly")
            return False
        return True

    def close(self) -> None:
        """Stop the engine thread after the run in progress, if any."""
        self._executor.shutdown(wait=True)
