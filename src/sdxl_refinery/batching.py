"""Batching: which requests may share one pass, what a run of several requests is, and the device policy.

Several jobs share a pass when everything but their words and seeds is equal: each image keeps its own
seed (its own generator) and its own prompt encoding, so it comes out as it would alone, within the float
rounding of a larger batch. Guidance scales must be equal too: diffusers' pipelines take one scalar, and a
per-sample guidance would mean rewriting their denoising loops (see docs/api.md, "Batching").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from .results import CancelToken, ProgressCallback
from .upscale_request import UpscaleRequest

if TYPE_CHECKING:
    from .controlnets import ControlSource
    from .embeddings import EmbeddingFile
    from .loras import LoraFile
    from .request import GenerationRequest

# Hires fix's enlargement by an upscaler model: an image and the (width, height) to bring it to.
Enlarge = Callable[[Image.Image, tuple[int, int]], Image.Image]

# What may differ between the requests of one pass: their words and their seeds.
PER_JOB_FIELDS = frozenset({"prompt", "negative_prompt", "seed", "n"})
# Edits start from the job's own image (and mask): they run alone; so do requests with ControlNet units or
# image prompts (their own images).
SOLO_FIELDS = ("init_image", "mask_image")

# Device defaults, from docs/performance.md. CUDA (H200): at 512 a batch of 4 images costs what one does
# (45.0 images per minute against 13.1), so up to 8 images wait at most 100 ms (1.5 base steps) for partners.
# CPU (2 cores): a batch of n costs n single images (full-size UNet at 512: 32.0 / 30.0 / 31.1 s per image for
# n = 1, 2, 4), and a pass finishes all its jobs at once, so batching would raise mean latency: none.
CUDA_MAX_BATCH, CUDA_WINDOW_MS = 8, 100


def batch_key(request: GenerationRequest | UpscaleRequest) -> str | None:
    """What a request must share with others to run in one pass with them (a digest of every field but its
    words and seeds, for queues to match on); None when it runs alone (img2img and inpainting start from the
    request's own image; upscales)."""
    if isinstance(request, UpscaleRequest):
        return None
    if any(getattr(request, name) is not None for name in SOLO_FIELDS) or request.controlnets or request.image_prompts:
        return None
    # LoRAs compare as applied: the field's and the prompt's <lora:...> tags together.
    shared = request.model_dump(mode="json", exclude={*PER_JOB_FIELDS, "loras"})
    shared["all_loras"] = [[lora.name, lora.weight] for lora in request.all_loras]
    return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:32]


def default_batching(device: str) -> tuple[int, int]:
    """The batch size in images and the window in milliseconds for a device: CUDA batches, others do not."""
    if device.startswith("cuda"):
        return CUDA_MAX_BATCH, CUDA_WINDOW_MS
    return 1, 0


@dataclass
class BatchCall:
    """One job's part of a batched call to the service.

    Attributes:
        request: what to render; its key (`batch_key`) equals every other call's of the batch.
        output_path: where to write its PNG (a batch of its own `n` writes `stem-1.png`, ...), or None.
        on_progress: its own progress reports (from the engine thread).
        cancel: its own token: cancelling it stops this job only.
        preview_every: a preview every this many of its steps (0: none).
        allow_paths: whether its models and LoRAs may be paths or Hub ids (the library, the CLI), or only names
            from the service's folders (jobs that came over HTTP, resolved again when they run).
    """

    request: GenerationRequest | UpscaleRequest
    output_path: str | Path | None = None
    on_progress: ProgressCallback | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    preview_every: int = 0
    allow_paths: bool = True


@dataclass
class RunItem:
    """One request's share of an engine run: its seeds (one image each), progress and token."""

    request: GenerationRequest
    seeds: list[int]
    on_progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    preview_every: int = 0
    hires_enlarge: Enlarge | None = None  # hires fix by an upscaler model (None: latent or a resampler)
    control_sources: list[ControlSource] = field(default_factory=list)  # each ControlNet unit's model and annotator
    image_prompt_files: list[Path] = field(default_factory=list)  # each image prompt's IP-Adapter file


@dataclass
class Run:
    """What the engine runs in one go: one or more requests of one batch key, their LoRAs (equal for all,
    since they are part of the key), as checked files with weights, and the embeddings their prompts use."""

    items: list[RunItem]
    loras: list[tuple[LoraFile, float]] = field(default_factory=list)
    embeddings: list[EmbeddingFile] = field(default_factory=list)  # every one any of the items' prompts uses
