"""ControlNet on the tiny pair: a tiny SDXL ControlNet built from the tiny base UNet at test time, guiding the
base as diffusers' ControlNet pipelines driven by hand do, alone and two at once, from noise and from an image."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.control import ControlUnit
from sdxl_refinery.controlnets import ControlNetFolder
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.png import a1111_parameters

from .hand_driven import PROMPT, HandDriven
from .test_edits import fresh_schedulers, generators, picture, pixels

SIZE = {"width": 64, "height": 64}
STEPS = {"num_inference_steps": 6, "refiner_steps": 3, "seed": 3}


def _tiny_controlnet(base: Path, seed: int) -> ControlNetModel:
    """A ControlNet made from the tiny base UNet, its zero convolutions given random weights (trained ones are
    not zero; zeros would make any control image a no-op)."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            block.weight.copy_(torch.randn(block.weight.shape, generator=generator) * 0.3)
    return controlnet.eval()


@pytest.fixture(scope="module")
def folder(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("controlnet")
    _tiny_controlnet(tiny_pair[0], 1).save_pretrained(root / "tiny-canny")
    _tiny_controlnet(tiny_pair[0], 2).save_pretrained(root / "depth" / "tiny-depth")
    sd15 = root / "sd15-canny"
    sd15.mkdir()
    (sd15 / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "cross_attention_dim": 768}))
    return root


@pytest.fixture
def with_folder(service: ImageService, folder: Path, monkeypatch: pytest.MonkeyPatch) -> ImageService:
    monkeypatch.setattr(service, "controlnet_folder", ControlNetFolder(folder))
    return service


def edges() -> Image.Image:
    """A control map as a user gives one ready-made: white lines on black."""
    image = Image.new("RGB", (64, 64))
    pixels_ = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels_[16:48, 30:34] = 255
    pixels_[30:34, 8:56] = 255
    image = Image.fromarray(pixels_)
    return image


def _hand(hand: HandDriven, controlnet: Any, request: GenerationRequest, control: dict[str, Any],
          image: Image.Image | None = None) -> np.ndarray:  # fmt: skip
    """diffusers as its users drive it: the base's ControlNet pipeline, then the refiner, one seed."""
    kind = StableDiffusionXLControlNetPipeline if image is None else StableDiffusionXLControlNetImg2ImgPipeline
    base = kind.from_pipe(hand.base, controlnet=controlnet)
    fresh_schedulers(base, hand.refiner)
    common: dict[str, Any] = {"guidance_scale": request.guidance_scale, "generator": generators([request.seed or 0])}
    start = {"image": image, "strength": request.strength} if image is not None else SIZE
    latents = base(prompt=PROMPT, num_inference_steps=request.num_inference_steps, output_type="latent", **start,
                   **control, **common).images  # fmt: skip
    refined = hand.refiner(prompt=PROMPT, image=latents, strength=0.3, num_inference_steps=10, output_type="pil",
                           **common).images  # fmt: skip
    return pixels(refined)


def _unit(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny-canny", "image": edges(), **fields}


def test_the_folder_lists_sdxl_controlnets_and_says_why_others_are_not(folder: Path) -> None:
    entries = {entry.name: entry for entry in ControlNetFolder(folder).entries(context_width=80)}
    assert entries["tiny-canny"].reason is None and entries["depth/tiny-depth"].reason is None
    assert "made for SD 1.x" in str(entries["sd15-canny"].reason)


async def test_one_unit_equals_diffusers_controlnet_pipeline(with_folder: ImageService, hand: HandDriven,
                                                             folder: Path) -> None:  # fmt: skip
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[_unit(weight=0.8, guidance_end=0.7)])
    result = await with_folder.generate(request)
    controlnet = ControlNetModel.from_pretrained(folder / "tiny-canny")
    expected = _hand(
        hand,
        controlnet,
        request,
        {
            "image": edges(),
            "controlnet_conditioning_scale": 0.8,
            "control_guidance_start": [0.0],
            "control_guidance_end": [0.7],
        },
    )
    assert np.abs(pixels(result.images) - expected).max() <= 2.0
    plain = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    assert np.abs(pixels(result.images) - pixels(plain.images)).max() > 10  # the control changed the image
    text = a1111_parameters(result.metadata())
    assert 'ControlNet 0: "Module: none, Model: tiny-canny, Weight: 0.8, Resize Mode: Crop and resize' in text


async def test_weight_zero_equals_no_control(with_folder: ImageService) -> None:
    plain = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS))
    zero = await with_folder.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[_unit(weight=0)]))
    assert np.abs(pixels(zero.images) - pixels(plain.images)).max() <= 2.0


@pytest.mark.parametrize(("mode", "guidance"), [("ControlNet is more important", 5.0),
                                               ("My prompt is more important", 1.0)])  # fmt: skip
async def test_control_modes_equal_diffusers_guess_mode(with_folder: ImageService, hand: HandDriven, folder: Path,
                                                        mode: str, guidance: float) -> None:  # fmt: skip
    """diffusers' guess mode is A1111's "ControlNet is more important" (log-spaced residuals, the unconditional
    half uncontrolled); without guidance's unconditional half, "My prompt is more important" is the same."""
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, guidance_scale=guidance,
                                controlnets=[_unit(control_mode=mode)])  # fmt: skip
    result = await with_folder.generate(request)
    controlnet = ControlNetModel.from_pretrained(folder / "tiny-canny")
    expected = _hand(hand, controlnet, request, {"image": edges(), "guess_mode": True})
    assert np.abs(pixels(result.images) - expected).max() <= 2.0
    balanced = await with_folder.generate(request.model_copy(update={"controlnets": (ControlUnit(**_unit()),)}))
    assert np.abs(pixels(result.images) - pixels(balanced.images)).max() > 2.0


async def test_the_modes_differ_under_guidance_and_end_with_their_pass(with_folder: ImageService) -> None:
    balanced = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[_unit()])
    before = await with_folder.generate(balanced)
    images = {}
    for mode in ("My prompt is more important", "ControlNet is more important"):
        request = balanced.model_copy(update={"controlnets": (ControlUnit(**_unit(control_mode=mode)),)})
        images[mode] = pixels((await with_folder.generate(request)).images)
    assert np.abs(images["My prompt is more important"] - images["ControlNet is more important"]).max() > 2.0
    after = await with_folder.generate(balanced)
    assert np.array_equal(pixels(before.images), pixels(after.images))  # no mode left on the shared model


async def test_hires_fix_with_a_unit_equals_diffusers(with_folder: ImageService, hand: HandDriven,
                                                      folder: Path) -> None:  # fmt: skip
    """Both passes controlled, as A1111 does: the first by the map at the image's size, the second (image to
    image at the hires size) by the map made at that size."""
    request = GenerationRequest(prompt=PROMPT, enable_hr=True, hr_scale=2, hr_upscaler="Latent", strength=0.5,
                                **SIZE, **STEPS, controlnets=[_unit(weight=0.8)])  # fmt: skip
    result = await with_folder.generate(request)
    assert result.images[0].size == (128, 128)
    controlnet = ControlNetModel.from_pretrained(folder / "tiny-canny")
    text = StableDiffusionXLControlNetPipeline.from_pipe(hand.base, controlnet=controlnet)
    img2img = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(hand.base, controlnet=controlnet)
    fresh_schedulers(text, img2img, hand.refiner)
    common: dict[str, Any] = {"guidance_scale": request.guidance_scale, "generator": generators(result.seeds),
                              "controlnet_conditioning_scale": 0.8}  # fmt: skip
    first = text(prompt=PROMPT, image=edges(), num_inference_steps=6, output_type="latent", **SIZE, **common).images
    upscaled = torch.nn.functional.interpolate(first, size=(16, 16), mode="bilinear", antialias=False)
    hires_map = with_folder.control_map(ControlUnit(**_unit()), 128, 128)
    second = img2img(prompt=PROMPT, image=upscaled, control_image=hires_map, strength=0.5, num_inference_steps=6,
                     output_type="latent", **common).images  # fmt: skip
    del common["controlnet_conditioning_scale"]
    expected = hand.refiner(prompt=PROMPT, image=second, strength=0.3, num_inference_steps=10, output_type="pil",
                            **common).images  # fmt: skip
    assert np.abs(pixels(result.images) - pixels(expected)).max() <= 2.0


async def test_two_units_equal_diffusers_multicontrolnet(with_folder: ImageService, hand: HandDriven,
                                                         folder: Path) -> None:  # fmt: skip
    second = picture()
    units = [_unit(weight=0.7), _unit(model="depth/tiny-depth", image=second, weight=0.5, guidance_start=0.2)]
    request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=units)
    result = await with_folder.generate(request)
    multi = MultiControlNetModel([ControlNetModel.from_pretrained(folder / "tiny-canny"),
                                  ControlNetModel.from_pretrained(folder / "depth" / "tiny-depth")])  # fmt: skip
    expected = _hand(
        hand,
        multi,
        request,
        {
            "image": [edges(), second],
            "controlnet_conditioning_scale": [0.7, 0.5],
            "control_guidance_start": [0.0, 0.2],
            "control_guidance_end": [1.0, 1.0],
        },
    )
    assert np.abs(pixels(result.images) - expected).max() <= 2.0


async def test_image_to_image_with_canny_equals_diffusers(with_folder: ImageService, hand: HandDriven,
                                                          folder: Path) -> None:  # fmt: skip
    init = picture()
    unit = _unit(image=init, preprocessor="canny", threshold_a=50, threshold_b=150)
    request = GenerationRequest(prompt=PROMPT, init_image=init, strength=0.6, **STEPS, controlnets=[unit])
    result = await with_folder.generate(request)
    canny = Image.fromarray(cv2.Canny(np.asarray(init), 50, 150)).convert("RGB")  # A1111's canny, by hand
    controlnet = ControlNetModel.from_pretrained(folder / "tiny-canny")
    expected = _hand(hand, controlnet, request, {"control_image": canny, "controlnet_conditioning_scale": 1.0,
                                                 "control_guidance_start": [0.0], "control_guidance_end": [1.0]},
                     image=init)  # fmt: skip
    assert np.abs(pixels(result.images) - expected).max() <= 2.0


async def test_bad_units_are_refused_naming_the_field_before_any_work(with_folder: ImageService) -> None:
    cases = [({"model": "nope"}, "controlnets.0.model", "no ControlNet 'nope'; known: depth/tiny-depth, tiny-canny"),
             ({"model": "sd15-canny"}, "controlnets.0.model", "made for SD 1.x"),
             ({"preprocessor": "blur"}, "controlnets.0.preprocessor", "not a preprocessor Refinery runs"),
             ({"preprocessor": "depth_midas"}, "controlnets.0.preprocessor", "needs annotator weights"),
             ({"image": Image.new("RGB", (5000, 4000))}, "controlnets.0.image",
              "at most 16777216 are taken")]  # fmt: skip
    for change, field, words in cases:
        with pytest.raises(InvalidRequest) as caught:
            request = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[_unit(**change)])
            await with_folder.generate(request)
        assert caught.value.field == field and words in caught.value.rule, (change, caught.value)
    with pytest.raises(InvalidRequest, match="hires fix's second pass too.*sequential mode only"):
        GenerationRequest(prompt=PROMPT, **SIZE, enable_hr=True, mode="handoff", controlnets=[_unit()])


async def test_inpainting_with_a_unit_equals_diffusers_and_keeps_unmasked_pixels(
    with_folder: ImageService, hand: HandDriven, folder: Path
) -> None:
    from diffusers import StableDiffusionXLControlNetInpaintPipeline, StableDiffusionXLInpaintPipeline
    from PIL import ImageFilter

    from .test_edits import box_mask

    init, mask = picture(), box_mask()
    request = GenerationRequest(prompt=PROMPT, init_image=init, mask_image=mask, strength=0.8, mask_blur=4,
                                num_inference_steps=10, refiner_steps=3, seed=5, **SIZE,
                                controlnets=[_unit(weight=0.9)])  # fmt: skip
    result = await with_folder.generate(request)
    blurred = mask.filter(ImageFilter.GaussianBlur(4))
    controlnet = ControlNetModel.from_pretrained(folder / "tiny-canny")
    base = StableDiffusionXLControlNetInpaintPipeline.from_pipe(hand.base, controlnet=controlnet)
    refiner = StableDiffusionXLInpaintPipeline.from_pipe(hand.refiner)
    fresh_schedulers(base, refiner)
    common: dict[str, Any] = {"guidance_scale": 8.0, "generator": generators(result.seeds), **SIZE}
    latents = base(prompt=PROMPT, image=init, mask_image=blurred, control_image=edges(), strength=0.8,
                   controlnet_conditioning_scale=0.9, num_inference_steps=10, output_type="latent",
                   **common).images  # fmt: skip
    refined = refiner(prompt=PROMPT, image=latents, mask_image=blurred, strength=0.3, num_inference_steps=10,
                      output_type="pil", **common).images[0]  # fmt: skip
    expected = Image.composite(refined, init, blurred)
    ours = pixels(result.images)[0]
    assert np.abs(ours - pixels([expected])[0]).max() <= 2.0
    untouched = np.asarray(blurred) == 0
    assert np.array_equal(ours[untouched], np.asarray(init, dtype=np.float64)[untouched])  # exactly the original


async def test_only_masked_inpainting_cuts_the_map_where_it_cuts_the_picture(with_folder: ImageService) -> None:
    from diffusers.image_processor import VaeImageProcessor
    from PIL import ImageDraw

    init, mask, whole = picture(96, 80), Image.new("L", (96, 80), 0), Image.new("RGB", (96, 80))
    ImageDraw.Draw(mask).rectangle((60, 10, 80, 30), fill=255)
    for x in range(4, 96, 12):
        ImageDraw.Draw(whole).line((x, 0, 95 - x, 79), fill="white", width=2)
    common: dict[str, Any] = {"prompt": PROMPT, "init_image": init, "mask_image": mask, "inpaint_full_res": True,
                              "inpaint_full_res_padding": 8, "mask_blur": 2, **SIZE, **STEPS}  # fmt: skip
    unit = {"model": "tiny-canny", "resize_mode": "Just resize"}
    guided = await with_folder.generate(GenerationRequest(**common, controlnets=[{**unit, "image": whole}]))
    box = tuple(int(edge) for edge in VaeImageProcessor.get_crop_region(mask, 64, 64, pad=8))
    cut = whole.crop(box).resize((64, 64), Image.Resampling.LANCZOS)  # what the picture's box becomes
    given = await with_folder.generate(GenerationRequest(**common, controlnets=[{**unit, "image": cut}]))
    assert np.array_equal(pixels(guided.images), pixels(given.images))
    plain = await with_folder.generate(GenerationRequest(**common))
    assert np.abs(pixels(guided.images) - pixels(plain.images)).max() > 2.0  # the map guided the box
    assert np.array_equal(pixels(guided.images)[0][60:, :40], np.asarray(init, dtype=np.float64)[60:, :40])


async def test_a_control_image_given_only_by_its_recorded_hash_is_refused_naming_it(
    with_folder: ImageService,
) -> None:
    recorded = GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[_unit()]).recorded()
    with pytest.raises(InvalidRequest, match="only its hash") as caught:
        await with_folder.generate(GenerationRequest(**recorded))
    assert caught.value.field == "controlnets.0.image"
