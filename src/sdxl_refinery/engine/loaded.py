"""`Engine`: a loaded base + refiner pair on one device, ready to run requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..batching import Run
from ..errors import InvalidRequest
from ..options import Precision, SpeedOptions
from .device import Placement, choose_placement
from .loader import LoadedPair, load_pair, pair_modules, place_pair
from .memory import initial_plan, module_bytes
from .passes import Outcome
from .recovery import MemoryPlan, free_memory
from .run import TwoStageRunner, encoder_layers
from .sources import ModelSource, resolve
from .speed import SpeedPlan, active_optimizations, apply_speed_plan, choose_speed_plan

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """A loaded base + refiner pair on one device, ready to run requests.

    Not thread-safe: diffusers pipelines keep scheduler state, so one caller
    at a time (the service's single engine thread) owns an `Engine`.
    """

    placement: Placement
    pair: LoadedPair
    runner: TwoStageRunner
    speed: SpeedPlan

    @classmethod
    def load(
        cls,
        base_model: str,
        refiner_model: str,
        device: str = "auto",
        precision: Precision | str = Precision.AUTO,
        speed: SpeedOptions | None = None,
    ) -> Engine:
        """Resolve, place and load the pair, then apply the speed plan for the device.

        Raises:
            InvalidRequest: unknown or absent device, unknown precision.
            ModelLoadError: a model reference cannot be resolved or loaded.
        """
        placement = choose_placement(device, precision)
        log.info("Device %s, precision %s: %s", placement.device, placement.precision_name, placement.reason)
        base_source: ModelSource = resolve(base_model, "base")
        refiner_source: ModelSource = resolve(refiner_model, "refiner")
        # 1. Load both pipelines into CPU memory, in the policy's dtypes.
        pair = load_pair(base_source, refiner_source, placement)
        # 2. Pick the memory plan from the device's free memory, then place the models.
        memory_plan = _initial_memory_plan(pair, placement)
        place_pair(pair, placement, offload=memory_plan.offload is not None)
        # 3. Layout, fused projections, compilation, threads.
        plan = choose_speed_plan(placement, speed, offload=memory_plan.offload is not None)
        pair.base.unet, pair.refiner.unet = apply_speed_plan([pair.base.unet, pair.refiner.unet], pair.base.vae, plan)
        log.info("Speed plan: %s", ", ".join(plan.names()) or "plain eager models")
        return cls(placement, pair, TwoStageRunner(pair, placement, memory_plan), plan)

    @property
    def context_width(self) -> int:
        """The base UNet's cross-attention width: what a LoRA must have been trained for."""
        width: int = self.pair.base.unet.config.cross_attention_dim
        return width

    @property
    def encoder_layers(self) -> int:
        """Layers of the shallowest text encoder of the pair: the deepest `clip_skip` it takes."""
        return encoder_layers(self.pair)

    @property
    def memory_plan(self) -> str:
        """The memory plan the next run starts under."""
        return self.runner.memory_plan.name

    @property
    def optimizations(self) -> list[str]:
        """Speed options in effect, read from the models themselves."""
        return active_optimizations([self.pair.base.unet, self.pair.refiner.unet], self.pair.base.vae)

    @property
    def models(self) -> dict[str, str]:
        """The resolved references, for every image's metadata."""
        return {
            "base": self.pair.base_source.name,
            "base_source": self.pair.base_source.describe(),
            "refiner": self.pair.refiner_source.name,
            "refiner_source": self.pair.refiner_source.describe(),
            **{f"{role}_hash": value for role, value in self.pair.hashes.items()},
        }

    def close(self) -> None:
        """Release the models' memory now (before another pair loads): every module goes to the meta device,
        so nothing is kept even while something still refers to this engine. It cannot run afterwards."""
        for module in pair_modules(self.pair):
            module.to("meta")
        free_memory()
        log.info("Released %s + %s", self.pair.base_source.describe(), self.pair.refiner_source.describe())

    def run(self, run: Run) -> list[Outcome]:
        """Run the requests of `run` (one batch key) with its LoRAs applied; see `TwoStageRunner.run`.

        Raises:
            InvalidRequest: a LoRA's weights fit no layer of these models (field `loras`).
        """
        if run.loras and self.speed.compile_mode is not None:
            raise InvalidRequest("loras", "not available while the UNets are compiled (REFINERY_COMPILE=on holds "
                                 "their weights in the compiled graphs)")  # fmt: skip
        return self.runner.run(run)


def _initial_memory_plan(pair: LoadedPair, placement: Placement) -> MemoryPlan:
    """The lightest plan not needed for the documented recipe (1024x1024, one image); see memory.py."""
    modules = pair_modules(pair)
    weights = module_bytes(modules)
    largest = max(module_bytes([module]) for module in modules)
    # On CPU the weights already sit in the RAM being measured; elsewhere they are still to be placed.
    plan, reason = initial_plan(placement.device, weights, largest, placement.dtype.itemsize, placement.device == "cpu")
    log.info("Memory plan %s", reason)
    return plan
