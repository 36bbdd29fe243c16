"""One call of a batch on its way through the service: checked before any work, then finished into its
result and PNGs once the engine has run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .batching import BatchCall, Enlarge, RunItem
from .controlnets import ControlSource
from .embeddings import EmbeddingFile
from .loras import LoraFile
from .png import numbered_paths, write_png
from .request import GenerationRequest
from .results import GenerationResult

if TYPE_CHECKING:
    from .engine.passes import EngineOutput
    from .service import RunsRequests

log = logging.getLogger("sdxl_refinery")


@dataclass
class PreparedCall:
    """A call checked before any work: its seeds and resolved models and LoRAs."""

    call: BatchCall
    seeds: list[int]
    models: tuple[str | None, str | None]
    loras: list[tuple[LoraFile, float]]
    hires_enlarge: Enlarge | None = None
    embeddings: list[EmbeddingFile] = field(default_factory=list)  # those its prompt and negative prompt use
    control_sources: list[ControlSource] = field(default_factory=list)  # each ControlNet unit's model and annotator
    image_prompt_files: list[Path] = field(default_factory=list)  # each image prompt's IP-Adapter file

    def item(self) -> RunItem:
        call = self.call
        assert isinstance(call.request, GenerationRequest)
        return RunItem(call.request, self.seeds, call.on_progress, call.cancel, call.preview_every,
                       self.hires_enlarge, self.control_sources, self.image_prompt_files)  # fmt: skip


def finish_call(entry: PreparedCall, output: EngineOutput, engine: RunsRequests) -> GenerationResult:
    """The call's result, its PNGs written (atomically) when it asked for them.

    Raises:
        Cancelled: the call was cancelled before its images were written.
        StorageError: a PNG could not be written.
    """
    request, loras = entry.call.request, entry.loras
    assert isinstance(request, GenerationRequest)
    result = GenerationResult(
        images=output.images,
        seeds=entry.seeds,
        base_steps=output.base_steps,
        refiner_steps=output.refiner_steps,
        refined=output.refined,
        refinement_error=output.refinement_error,
        device=engine.placement.device,
        precision=engine.placement.precision_name,
        precision_policy=engine.placement.precision,
        timings=output.timings,
        request=request,
        models=engine.models,
        memory_plan=output.memory_plan,
        recoveries=output.recoveries,
        optimizations=engine.optimizations,
        interrupted=output.interrupted,
        loras=[{"name": lora.name, "weight": weight, "hash": lora.short_hash} for lora, weight in loras],
        embeddings=[{"name": embedding.name, "hash": embedding.short_hash} for embedding in entry.embeddings],
    )
    if entry.call.output_path is not None:
        entry.call.cancel.raise_if_cancelled()
        metadata = result.metadata()
        paths = numbered_paths(Path(entry.call.output_path), request.n)
        for index, (image, path) in enumerate(zip(result.images, paths, strict=True)):
            write_png(image, path, metadata, index)
            result.paths.append(str(path))
            log.info("Image saved to %s", path)
    return result
