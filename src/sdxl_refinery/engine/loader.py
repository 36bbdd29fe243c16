"""Loads the base and refiner pipelines once, with one copy of the shared parts.

The refiner reuses the base's `text_encoder_2` and VAE (SDXL 1.0 ships the
same weights in both repositories), so they are in memory once.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from ..errors import ModelLoadError, causes
from .device import Placement
from .inventory import tensor_problems
from .single_file import inspect_checkpoint, materialize_config
from .sources import ModelSource, SourceKind, check_sources, default_hash_cache, short_hash, weights_file
from .tiny import build_tiny_pair

log = logging.getLogger(__name__)


@dataclass
class LoadedPair:
    """The two pipelines, on their device, sharing text_encoder_2 and VAE.

    Attributes:
        hashes: short SHA-256 of each role's weights (`base`, `refiner`), when known.
    """

    base: StableDiffusionXLPipeline
    refiner: StableDiffusionXLImg2ImgPipeline
    base_source: ModelSource
    refiner_source: ModelSource
    hashes: dict[str, str]


def _from_single_file(pipeline_class: Any, source: ModelSource, role: str, placement: Placement, **shared: Any) -> Any:
    """Load an SGM single file with configs shipped in the package: no network."""
    path = Path(source.location)
    info = inspect_checkpoint(path)  # its kind was checked with the pair (sources.check_sources)
    # The `models verify` check first: diffusers meets a missing tensor as "Cannot copy out of meta tensor".
    if problems := tensor_problems(path, info):
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError(f"{role} model {path}: incomplete or damaged checkpoint: {'; '.join(problems[:3])}{more}")
    with tempfile.TemporaryDirectory(prefix="refinery-config-") as scratch:
        config_folder = materialize_config(info.config, Path(scratch))
        return pipeline_class.from_single_file(
            str(path), config=str(config_folder), local_files_only=True, dtype=placement.dtype, **shared
        )


def _variant(source: ModelSource, placement: Placement) -> str | None:
    """Use fp16 weight files when they exist and the precision is fp16 (half the download and load)."""
    if placement.dtype != torch.float16:
        return None
    if source.kind is SourceKind.FOLDER:
        unet = Path(source.location) / "unet"
        return "fp16" if any(unet.glob("*.fp16.safetensors")) else None
    if source.kind is SourceKind.HUB:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "unet/diffusion_pytorch_model.fp16.safetensors")
        return "fp16" if isinstance(cached, str) else None
    return None


def _load(pipeline_class: Any, source: ModelSource, role: str, placement: Placement, **shared: Any) -> Any:
    """Load one pipeline from a folder, the Hub or a single file.

    Raises:
        ModelLoadError: naming the role, the reference and the cause.
    """
    try:
        if source.kind is SourceKind.SINGLE_FILE:
            return _from_single_file(pipeline_class, source, role, placement, **shared)
        return pipeline_class.from_pretrained(
            source.location,
            dtype=placement.dtype,
            use_safetensors=True,
            variant=_variant(source, placement),
            **shared,
        )
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        if source.kind is SourceKind.HUB and _hub_unreachable(error):
            raise ModelLoadError(_offline_message(role, source.location, error)) from error
        hint = " (safetensors only: .bin/pickle weights are refused)" if "safetensors" in str(error) else ""
        raise ModelLoadError(f"{role} model {source.location}: could not be loaded{hint}: {error}") from error


_UNREACHABLE = ("outgoing traffic has been disabled", "couldn't connect", "could not connect", "local_files_only",
                "connection", "offline", "name resolution", "timed out")  # fmt: skip


def _hub_unreachable(error: BaseException) -> bool:
    """Whether a Hub load failed because the files are not cached and the Hub cannot be reached."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    return any(isinstance(seen, LocalEntryNotFoundError) or any(mark in str(seen).lower() for mark in _UNREACHABLE)
               for seen in causes(error))  # fmt: skip


def _offline_message(role: str, hub_id: str, error: BaseException) -> str:
    """What happened and what to do next, for weights that are neither cached nor downloadable."""
    from huggingface_hub.constants import HF_HUB_CACHE

    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = first_line if len(first_line) <= 160 else first_line[:160].rsplit(" ", 1)[0] + " ..."
    return (
        f"{role} model {hub_id}: not in the local Hugging Face cache ({HF_HUB_CACHE}) and the Hub cannot be "
        f"reached ({cause}). SDXL base and refiner 1.0 come from the Hub: about 13 GB, downloaded once into "
        "that cache. Next: with network, run `refinery models pull` (or run this again); offline, pass local "
        "weights with --base/--refiner (a .safetensors checkpoint or a diffusers folder), or prove the install "
        "with the tiny random-weight pair: --base tiny --refiner tiny (make generate MODEL=tiny)."
    )


def _hash(source: ModelSource) -> str | None:
    if source.kind is SourceKind.SINGLE_FILE:
        return short_hash(Path(source.location), default_hash_cache())
    if source.kind is SourceKind.FOLDER:
        weights = weights_file(Path(source.location))
        return short_hash(weights, default_hash_cache()) if weights else None
    if source.kind is SourceKind.HUB:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source.location, local_files_only=True, allow_patterns=["unet/*"]))
        except OSError:
            return None
        weights = weights_file(folder)
        return short_hash(weights, default_hash_cache()) if weights else None
    return None


def load_pair(base_source: ModelSource, refiner_source: ModelSource, placement: Placement) -> LoadedPair:
    """Load base and refiner onto `placement`'s device and dtypes.

    Raises:
        ModelLoadError: a model cannot be loaded, or the pair is refused by `check_sources`.
    """
    check_sources(base_source, refiner_source)
    if base_source.kind is SourceKind.TINY:
        with tempfile.TemporaryDirectory(prefix="refinery-tiny-") as workdir:
            base, refiner = build_tiny_pair(Path(workdir))
    else:
        base = _load(StableDiffusionXLPipeline, base_source, "base", placement)
        # The refiner with its own text encoder 2 and VAE; each is replaced by the base's only if identical.
        refiner = _load(StableDiffusionXLImg2ImgPipeline, refiner_source, "refiner", placement)
        share_identical(base, refiner)
    # Cast here, still in CPU memory: `place_pair` moves to the device once the memory plan is known.
    base.to(dtype=placement.dtype)
    refiner.unet.to(dtype=placement.dtype)
    refiner.text_encoder_2.to(dtype=placement.dtype)
    base.vae.to(dtype=placement.vae_dtype)
    refiner.vae.to(dtype=placement.vae_dtype)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    hashes = {role: h for role, source in (("base", base_source), ("refiner", refiner_source)) if (h := _hash(source))}
    log.info(
        "Loaded base %s and refiner %s for %s (%s)",
        base_source.describe(),
        refiner_source.describe(),
        placement.device,
        placement.precision_name,
    )
    return LoadedPair(base, refiner, base_source, refiner_source, hashes)


def share_identical(base: Any, refiner: Any) -> list[str]:
    """Give the refiner the base's text encoder 2 and VAE where its own hold the very same tensors (SDXL 1.0's
    do), so one copy is loaded; a refiner whose own differ keeps them. Returns the names shared."""
    shared = []
    for name in ("text_encoder_2", "vae"):
        own, base_part = getattr(refiner, name), getattr(base, name)
        if own is base_part or same_tensors(own, base_part):
            refiner.register_modules(**{name: base_part})
            shared.append(name)
    if "text_encoder_2" in shared:
        refiner.register_modules(tokenizer_2=base.tokenizer_2)
    log.info("Refiner shares the base's %s; its own: %s", ", ".join(shared) or "nothing",
             ", ".join(sorted({"text_encoder_2", "vae"} - set(shared))) or "nothing")  # fmt: skip
    return shared


def same_tensors(first: Any, second: Any) -> bool:
    """Whether two modules hold the very same tensors (names, shapes, dtypes and every value)."""
    one, two = first.state_dict(), second.state_dict()
    if one.keys() != two.keys():
        return False
    return all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in
               ((one[key], two[key]) for key in one))  # fmt: skip


def place_pair(pair: LoadedPair, placement: Placement, offload: bool) -> None:
    """Move the pair onto its device, unless an offload plan will move each part when it runs."""
    if offload:
        return
    pair.base.to(placement.device)
    for module in (pair.refiner.unet, pair.refiner.text_encoder_2, pair.refiner.vae):
        module.to(placement.device)


def pair_modules(pair: LoadedPair) -> list[Any]:
    """Every distinct model of the pair (the refiner's text encoder 2 and VAE when they are its own)."""
    base, refiner = pair.base, pair.refiner
    modules = [base.unet, base.text_encoder, base.text_encoder_2, base.vae, refiner.unet, refiner.text_encoder_2,
               refiner.vae]  # fmt: skip
    return list({id(module): module for module in modules}.values())
