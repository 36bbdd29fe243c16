"""The engine: device policy, model sources, the two-stage run, previews, the tiny pair.

Only the service imports this package. diffusers and torch types stay inside;
what leaves is our request, result and progress types, PIL images and numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..request import CancelToken, GenerationRequest, ProgressCallback
from .device import Placement, choose_placement
from .loader import LoadedPair, load_pair
from .run import EngineOutput, TwoStageRunner
from .sources import ModelSource, resolve

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineOutput", "choose_placement"]


@dataclass
class Engine:
    """A loaded base + refiner pair on one device, ready to run requests.

    Not thread-safe: diffusers pipelines keep scheduler state, so one caller
    at a time (the service's single engine thread) owns an `Engine`.
    """

    placement: Placement
    pair: LoadedPair
    runner: TwoStageRunner

    @classmethod
    def load(cls, base_model: str, refiner_model: str, device: str = "auto", precision: str = "auto") -> Engine:
        """Resolve, place and load the pair.

        Raises:
            InvalidRequest: unknown or absent device, unknown precision.
            ModelLoadError: a model reference cannot be resolved or loaded.
        """
        placement = choose_placement(device, precision)
        log.info("Device %s, precision %s: %s", placement.device, placement.precision_name, placement.reason)
        base_source: ModelSource = resolve(base_model, "base")
        refiner_source: ModelSource = resolve(refiner_model, "refiner")
        pair = load_pair(base_source, refiner_source, placement)
        return cls(placement, pair, TwoStageRunner(pair, placement))

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

    def run(
        self,
        request: GenerationRequest,
        seeds: list[int],
        on_progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        preview_every: int = 0,
    ) -> EngineOutput:
        """Run one request; see `TwoStageRunner.run`."""
        return self.runner.run(request, seeds, on_progress, cancel, preview_every)
