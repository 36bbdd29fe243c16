"""Loads the base and refiner pipelines once, with one copy of the shared parts.

The refiner reuses the base's `text_encoder_2` and VAE (SDXL 1.0 ships the
same weights in both repositories), so they are in memory once.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from ..errors import ModelLoadError
from .device import Placement
from .sources import ModelSource, SourceKind
from .tiny import build_tiny_pair

log = logging.getLogger(__name__)


@dataclass
class LoadedPair:
    """The two pipelines, on their device, sharing text_encoder_2 and VAE."""

    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    base_source: ModelSource
    refiner_source: ModelSource


def _load_tiny(placement: Placement) -> tuple[StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline]:
    with tempfile.TemporaryDirectory(prefix="refinery-tiny-") as workdir:
        return build_tiny_pair(Path(workdir))


def _load_base(source: ModelSource, placement: Placement) -> StableDiffusionXLPipeline:
    try:
        pipe: StableDiffusionXLPipeline = StableDiffusionXLPipeline.from_pretrained(
            source.location, torch_dtype=placement.dtype, use_safetensors=True
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"base model {source.location}: could not be loaded: {error}") from error
    return pipe


def _load_refiner(
    source: ModelSource, placement: Placement, base: StableDiffusionXLPipeline
) -> StableDiffusionXLImg2ImgPipeline:
    try:
        pipe: StableDiffusionXLImg2ImgPipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            source.location,
            text_encoder_2=base.text_encoder_2,
            tokenizer_2=base.tokenizer_2,
            vae=base.vae,
            torch_dtype=placement.dtype,
            use_safetensors=True,
        )
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"refiner model {source.location}: could not be loaded: {error}") from error
    return pipe


def load_pair(base_source: ModelSource, refiner_source: ModelSource, placement: Placement) -> LoadedPair:
    """Load base and refiner onto `placement`'s device and dtypes.

    Raises:
        ModelLoadError: a model cannot be loaded, or only one of the pair is `tiny`.
    """
    if (base_source.kind is SourceKind.TINY) != (refiner_source.kind is SourceKind.TINY):
        raise ModelLoadError("the tiny model comes as a pair: set both base and refiner to `tiny`")
    if base_source.kind is SourceKind.TINY:
        base, refiner = _load_tiny(placement)
    else:
        base = _load_base(base_source, placement)
        refiner = _load_refiner(refiner_source, placement, base)
    base.to(placement.device, placement.dtype)
    refiner.unet.to(placement.device, placement.dtype)
    base.vae.to(placement.device, placement.vae_dtype)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    log.info(
        "Loaded base %s and refiner %s on %s (%s)",
        base_source.describe(),
        refiner_source.describe(),
        placement.device,
        placement.precision_name,
    )
    return LoadedPair(base, refiner, base_source, refiner_source)
