"""img2img, inpainting and hires fix equal diffusers' own pipelines driven by hand (fp32, within 2/255)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from PIL import Image, ImageDraw, ImageFilter

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine.schedulers import scheduler_config
from sdxl_refinery.engine.tiny import tiny_inpainting_unet
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.samplers import Sampler, ScheduleType

from .hand_driven import PROMPT, HandDriven

SIZE = {"width": 64, "height": 64}


def picture(width: int = 64, height: int = 64) -> Image.Image:
    """A deterministic picture with structure (gradients and a disc), not noise."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height) + 64], axis=-1)
    image = Image.fromarray(pixels.astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(200, 40, 90))
    return image


def box_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 4, height // 4, width // 2, height * 3 // 4), fill=255)
    return mask


def fresh_schedulers(*pipes: Any) -> None:
    kind, settings = scheduler_config(Sampler.EULER, ScheduleType.AUTOMATIC)
    for pipe in pipes:
        pipe.scheduler = kind.from_config(pipe.scheduler.config, **settings)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float64) for image in images])


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


async def test_img2img_equals_diffusers_and_runs_steps_times_strength(service: ImageService, hand: HandDriven) -> None:
    init = picture()
    request = GenerationRequest(prompt=PROMPT, init_image=init, strength=0.6, num_inference_steps=10,
                                refiner_steps=3, seed=11, n=2, guidance_scale=7.0)  # fmt: skip
    result = await service.generate(request)
    assert (request.width, request.height) == (64, 64)  # the init image's own size
    assert (result.base_steps, result.refiner_steps, result.refined) == (6, 3, True)

    base = StableDiffusionXLImg2ImgPipeline.from_pipe(hand.base)
    fresh_schedulers(base, hand.refiner)
    made = generators(result.seeds)
    common: dict[str, Any] = {"guidance_scale": 7.0, "generator": made}
    latents = base(prompt=PROMPT, image=init, strength=0.6, num_inference_steps=10, num_images_per_prompt=2,
                   output_type="latent", **common).images  # fmt: skip
    expected = hand.refiner(prompt=[PROMPT] * 2, image=latents, strength=0.3, num_inference_steps=10,
                            output_type="pil", **common).images  # fmt: skip
    assert np.abs(pixels(result.images) - pixels(expected)).max() <= 2.0


async def test_inpainting_equals_diffusers_and_keeps_unmasked_pixels(service: ImageService, hand: HandDriven) -> None:
    init, mask = picture(), box_mask()
    request = GenerationRequest(prompt=PROMPT, init_image=init, mask_image=mask, strength=0.8, mask_blur=4,
                                num_inference_steps=10, refiner_steps=3, seed=5, **SIZE)  # fmt: skip
    result = await service.generate(request)
    assert (result.base_steps, result.refiner_steps) == (8, 3)

    blurred = mask.filter(ImageFilter.GaussianBlur(4))
    base = StableDiffusionXLInpaintPipeline.from_pipe(hand.base)
    refiner = StableDiffusionXLInpaintPipeline.from_pipe(hand.refiner)
    fresh_schedulers(base, refiner)
    common: dict[str, Any] = {"guidance_scale": 8.0, "generator": generators(result.seeds), **SIZE}
    latents = base(prompt=PROMPT, image=init, mask_image=blurred, strength=0.8, num_inference_steps=10,
                   output_type="latent", **common).images  # fmt: skip
    refined = refiner(prompt=PROMPT, image=latents, mask_image=blurred, strength=0.3, num_inference_steps=10,
                      output_type="pil", **common).images[0]  # fmt: skip
    expected = Image.composite(refined, init, blurred)
    ours = pixels(result.images)[0]
    assert np.abs(ours - pixels([expected])[0]).max() <= 2.0
    untouched = np.asarray(blurred) == 0
    assert untouched.sum() > 2000
    assert np.array_equal(ours[untouched], np.asarray(init, dtype=np.float64)[untouched])  # exactly the original
    assert np.abs(ours - np.asarray(init, dtype=np.float64)).max() > 10  # and the masked area was repainted


async def test_hires_fix_with_a_latent_upscaler_equals_diffusers(service: ImageService, hand: HandDriven) -> None:
    request = GenerationRequest(prompt=PROMPT, enable_hr=True, hr_scale=2, hr_upscaler="Latent", strength=0.5,
                                num_inference_steps=6, refiner_steps=3, seed=3, **SIZE)  # fmt: skip
    seen: list[tuple[int, int, int]] = []
    result = await service.generate(request, on_progress=lambda p: seen.append((p.stage, p.step, p.total)))
    assert result.images[0].size == (128, 128)
    assert (result.base_steps, result.refiner_steps) == (6 + 3, 3)
    assert [step for stage, step, total in seen if stage == 1 and total == 9] == list(range(1, 10))

    base = StableDiffusionXLImg2ImgPipeline.from_pipe(hand.base)
    fresh_schedulers(hand.base, base, hand.refiner)
    common: dict[str, Any] = {"guidance_scale": 8.0, "generator": generators(result.seeds)}
    first = hand.base(prompt=PROMPT, num_inference_steps=6, output_type="latent", **SIZE, **common).images
    upscaled = torch.nn.functional.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    second = base(prompt=PROMPT, image=upscaled, strength=0.5, num_inference_steps=6, output_type="latent",
                  **common).images  # fmt: skip
    expected = hand.refiner(prompt=PROMPT, image=second, strength=0.3, num_inference_steps=10, output_type="pil",
                            **common).images  # fmt: skip
    assert np.abs(pixels(result.images) - pixels(expected)).max() <= 2.0


@pytest.mark.parametrize("fill", ["fill", "latent noise", "latent nothing"])
async def test_every_masked_content_keeps_the_unmasked_pixels(service: ImageService, fill: str) -> None:
    init, mask = picture(), box_mask()
    request = GenerationRequest(prompt=PROMPT, init_image=init, mask_image=mask, inpainting_fill=fill, mask_blur=0,
                                num_inference_steps=4, refiner_steps=2, seed=1, **SIZE)  # fmt: skip
    ours = pixels((await service.generate(request)).images)[0]
    keep = np.asarray(mask) == 0
    assert np.array_equal(ours[keep], np.asarray(init, dtype=np.float64)[keep])
    assert np.abs(ours[~keep] - np.asarray(init, dtype=np.float64)[~keep]).max() > 10


async def test_only_masked_inpaints_the_padded_box_and_returns_the_whole_image(service: ImageService) -> None:
    init = picture(96, 80)
    mask = Image.new("L", (96, 80), 0)
    ImageDraw.Draw(mask).rectangle((60, 10, 80, 30), fill=255)
    request = GenerationRequest(prompt=PROMPT, init_image=init, mask_image=mask, inpaint_full_res=True,
                                inpaint_full_res_padding=8, mask_blur=2, num_inference_steps=4, refiner_steps=2,
                                seed=2, **SIZE)  # fmt: skip
    result = await service.generate(request)
    image = result.images[0]
    assert image.size == (96, 80) == request.output_size
    changed = np.abs(pixels([image])[0] - np.asarray(init, dtype=np.float64)).max(axis=-1) > 0
    ys, xs = np.nonzero(changed)
    assert changed.any() and xs.min() >= 50 and ys.max() <= 40  # only around the mask


async def test_a_recorded_image_hash_cannot_run(service: ImageService) -> None:
    recorded = GenerationRequest(prompt=PROMPT, init_image=picture(), **SIZE).recorded()
    request = GenerationRequest(**recorded)
    assert request.missing_images == ["init_image"]
    with pytest.raises(InvalidRequest, match="init_image"):
        await service.generate(request)


async def test_handoff_from_an_image_runs_the_planned_steps(service: ImageService) -> None:
    request = GenerationRequest(prompt=PROMPT, init_image=picture(), strength=0.5, num_inference_steps=20,
                                mode="handoff", switch_at=0.8, seed=8)  # fmt: skip
    seen: list[tuple[int, int, int]] = []
    result = await service.generate(request, on_progress=lambda p: seen.append((p.stage, p.step, p.total)))
    assert (result.base_steps, result.refiner_steps, result.refined) == (6, 4, True)
    assert seen[-1] == (2, 4, 4) and (1, 6, 6) in seen


@pytest.fixture(scope="module")
def inpainting_base(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with SDXL inpainting's 9-channel UNet, as a diffusers folder."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    pipe.unet = tiny_inpainting_unet()
    pipe.register_modules(unet=pipe.unet)
    folder = tmp_path_factory.mktemp("inpainting") / "base"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


async def test_a_9_channel_inpainting_checkpoint_equals_diffusers(inpainting_base: Path,
                                                                 tiny_pair: tuple[Path, Path]) -> None:  # fmt: skip
    service = ImageService(str(inpainting_base), str(tiny_pair[1]), device="cpu", precision="full")
    try:
        init, mask = picture(), box_mask()
        request = GenerationRequest(prompt=PROMPT, init_image=init, mask_image=mask, strength=1.0, mask_blur=0,
                                    num_inference_steps=6, refiner_steps=2, seed=4, **SIZE)  # fmt: skip
        ours = pixels((await service.generate(request)).images)[0]
        base = StableDiffusionXLInpaintPipeline.from_pretrained(inpainting_base)
        refiner = StableDiffusionXLInpaintPipeline.from_pretrained(tiny_pair[1], text_encoder_2=base.text_encoder_2,
                                                                   vae=base.vae)  # fmt: skip
        for pipe in (base, refiner):
            pipe.set_progress_bar_config(disable=True)
        fresh_schedulers(base, refiner)
        common: dict[str, Any] = {"guidance_scale": 8.0, "generator": generators([4]), **SIZE}
        latents = base(prompt=PROMPT, image=init, mask_image=mask, strength=1.0, num_inference_steps=6,
                       output_type="latent", **common).images  # fmt: skip
        refined = refiner(prompt=PROMPT, image=latents, mask_image=mask, strength=0.3, num_inference_steps=7,
                          output_type="pil", **common).images[0]  # fmt: skip
        expected = pixels([Image.composite(refined, init, mask)])[0]
        assert np.abs(ours - expected).max() <= 2.0
        # Without a mask it redraws the whole image; without an image it refuses, naming the field.
        whole = await service.generate(GenerationRequest(prompt=PROMPT, init_image=init, strength=0.5, seed=1,
                                                         num_inference_steps=4, refiner_steps=1))  # fmt: skip
        assert whole.images[0].size == (64, 64) and whole.base_steps == 2
        with pytest.raises(InvalidRequest, match="inpainting checkpoint") as caught:
            await service.generate(GenerationRequest(prompt=PROMPT, num_inference_steps=2, refiner_steps=1, **SIZE))
        assert caught.value.field == "init_image"
    finally:
        service.close()


async def test_an_interrupt_in_hires_fixs_first_pass_keeps_that_image(service: ImageService) -> None:
    from sdxl_refinery.request import CancelToken

    token = CancelToken()
    request = GenerationRequest(prompt=PROMPT, enable_hr=True, num_inference_steps=6, seed=3, **SIZE)

    def interrupt_at_step_2(progress: Any) -> None:
        if progress.stage == 1 and progress.step == 2:
            token.interrupt()

    result = await service.generate(request, on_progress=interrupt_at_step_2, cancel=token)
    assert result.interrupted and result.images[0].size == (64, 64)
    assert (result.base_steps, result.refiner_steps, result.refined) == (2, 0, False)


async def test_a_mask_of_another_size_is_stretched_onto_the_image(service: ImageService) -> None:
    small = box_mask(32, 32)
    common: dict[str, Any] = {"prompt": PROMPT, "init_image": picture(), "num_inference_steps": 4, "refiner_steps": 1,
                              "seed": 6, "mask_blur": 0}  # fmt: skip
    stretched = await service.generate(GenerationRequest(**common, mask_image=small))
    given = await service.generate(GenerationRequest(**common, mask_image=small.resize((64, 64), Image.LANCZOS)))
    assert np.array_equal(pixels(stretched.images), pixels(given.images))
