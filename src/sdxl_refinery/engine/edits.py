"""The base and refiner passes that start from an image: img2img, inpainting and hires fix's second pass.

Their pipelines are diffusers' own (img2img and inpainting), built once from the
loaded pair's components: the same modules, no copies. The refiner of an
inpainting request is diffusers' inpainting pipeline over the refiner's
components, so stage 2 repaints only the masked area too.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from ..batching import Enlarge
from ..editing import HiresUpscaler, InpaintFill
from ..errors import GenerationFailed
from ..request import GenerationRequest
from .image_prep import EditInputs
from .loader import LoadedPair

# The modules an edit pipeline shares with the live one (the image encoder while IP-Adapters are loaded).
_PIPELINE_PARTS = {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
                   "image_encoder", "feature_extractor"}  # fmt: skip


class EditPipelines:
    """diffusers' img2img and inpainting pipelines over the loaded pair's own modules, built on first use."""

    def __init__(self, pair: LoadedPair) -> None:
        self.pair = pair
        self._built: dict[str, Any] = {}

    def base_img2img(self) -> StableDiffusionXLImg2ImgPipeline:
        """The base model as an img2img pipeline (hires fix's second pass, img2img, a failed refiner's finish)."""
        return self._build("base_img2img", StableDiffusionXLImg2ImgPipeline, self.pair.base, False)

    def base_inpaint(self) -> StableDiffusionXLInpaintPipeline:
        return self._build("base_inpaint", StableDiffusionXLInpaintPipeline, self.pair.base, False)

    def refiner_inpaint(self) -> StableDiffusionXLInpaintPipeline:
        return self._build("refiner_inpaint", StableDiffusionXLInpaintPipeline, self.pair.refiner, True)

    def base_control(self, kind: str, controlnet: Any) -> Any:
        """The base as diffusers' ControlNet pipeline of `kind` (`text`, `img2img`, `inpaint`) over `controlnet`."""
        pipelines = {"text": StableDiffusionXLControlNetPipeline, "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
                     "inpaint": StableDiffusionXLControlNetInpaintPipeline}  # fmt: skip
        return self._build(f"base_control_{kind}", pipelines[kind], self.pair.base, False, controlnet=controlnet)

    def _build(self, key: str, kind: Any, source: Any, aesthetics: bool, **extra: Any) -> Any:
        # Built from the live pipeline's components each time they may have changed (a compiled or upcast UNet
        # is swapped in place on `source`), so the pipeline object is cached but its modules are re-read.
        parts = {name: module for name, module in source.components.items() if name in _PIPELINE_PARTS}
        parts.update(extra)
        pipe = self._built.get(key)
        if pipe is None:
            force_zeros = bool(source.config.get("force_zeros_for_empty_prompt", True))
            options = {"force_zeros_for_empty_prompt": force_zeros}
            if "requires_aesthetics_score" in inspect.signature(kind.__init__).parameters:  # not in ControlNet's
                options["requires_aesthetics_score"] = aesthetics
            pipe = kind(**parts, **options)
            pipe.set_progress_bar_config(disable=True)
            self._built[key] = pipe
        else:
            pipe.register_modules(**parts)
        return pipe


@contextlib.contextmanager
def vae_dtype_kept(vae: Any) -> Iterator[None]:
    """diffusers' img2img and inpainting pipelines upcast a `force_upcast` VAE to encode and then cast it to the
    UNet's dtype; the engine's policy (an fp32 VAE beside an fp16 UNet) is put back after."""
    dtype = vae.dtype
    try:
        yield
    finally:
        if vae.dtype != dtype:
            vae.to(dtype=dtype)


def is_inpainting_unet(unet: Any) -> bool:
    """Whether a UNet is an inpainting checkpoint's: 9 input channels (latents, mask, masked-image latents)."""
    return int(getattr(unet, "config", {}).get("in_channels", 4)) == 9


def inpaint_inputs(pair: LoadedPair, inputs: EditInputs, mask: Image.Image, request: GenerationRequest,
                   generators: list[torch.Generator]) -> dict[str, Any]:  # fmt: skip
    """The inpainting pipeline's `image` (and, where it cannot derive them, `masked_image_latents`): the init
    pixels, or for A1111's latent fills their encoded latents with the masked area replaced (random latents
    for "latent noise", zeros for "latent nothing")."""
    if request.inpainting_fill not in (InpaintFill.LATENT_NOISE, InpaintFill.LATENT_NOTHING):
        return {"image": inputs.init}
    _, latents = _encoded(pair, inputs.init)
    binary = torch.from_numpy(_binary(mask)).to(latents)[None, None]
    small = torch.nn.functional.interpolate(binary, size=latents.shape[-2:], mode="nearest")
    if request.inpainting_fill is InpaintFill.LATENT_NOTHING:
        image = (latents * (1 - small)).repeat(len(generators), 1, 1, 1)
    else:
        noise = torch.stack([torch.randn(latents.shape[1:], generator=generator) for generator in generators])
        image = latents * (1 - small) + noise.to(latents) * small
    if not is_inpainting_unet(pair.base.unet):
        return {"image": image}
    return {"image": image, "masked_image_latents": masked_image_latents(pair, inputs.init, mask)}


def masked_image_latents(pair: LoadedPair, init: Image.Image, mask: Image.Image) -> torch.Tensor:
    """What a 9-channel UNet is conditioned on: the unmasked pixels, encoded (diffusers derives them itself only
    when it is handed pixels, not latents)."""
    pixels, _ = _encoded(pair, init)
    keep = torch.from_numpy(_binary(mask) < 0.5).to(pixels)[None, None]
    return _encoded(pair, pixels * keep)[1]


def _encoded(pair: LoadedPair, image: Image.Image | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] and their latents (the distribution's mode, scaled as the pipelines scale them)."""
    vae = pair.base.vae
    pixels = pair.base.image_processor.preprocess(image) if isinstance(image, Image.Image) else image
    pixels = pixels.to(vae.device, vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode().float() * vae.config.scaling_factor
    return pixels, latents


def _binary(mask: Image.Image) -> Any:
    return (np.asarray(mask, dtype=np.float32) >= 128).astype(np.float32)


def upscale(
    latents: torch.Tensor, request: GenerationRequest, decode: Any, enlarge: Enlarge | None = None
) -> torch.Tensor | list[Image.Image]:
    """Hires fix's enlargement of the first pass: latent interpolation, or decoded pixels enlarged (by an
    upscaler model, or resized with Lanczos or Nearest) for the second pass to encode again.

    Args:
        decode: the engine's decode to PIL images (pixel upscalers only).
        enlarge: the request's upscaler model (when `hr_upscaler` names one).
    """
    width, height = request.hires_size
    upscaler = request.hires_upscaler
    if upscaler is None:
        if enlarge is None:
            raise GenerationFailed(f"hr_upscaler {request.hr_upscaler!r} is an upscaler model and none was loaded")
        return [enlarge(image, (width, height)) for image in decode(latents)]
    if upscaler.in_latent_space:
        mode, antialias = upscaler.interpolation
        size = (height // 8, width // 8)
        return torch.nn.functional.interpolate(latents, size=size, mode=mode, antialias=antialias)
    resample = Image.Resampling.LANCZOS if upscaler is HiresUpscaler.LANCZOS else Image.Resampling.NEAREST
    return [image.resize((width, height), resample) for image in decode(latents)]
