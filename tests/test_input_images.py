"""Input images and the edit fields of the request: read, checked, recorded and planned before any work."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from sdxl_refinery.editing import HiresUpscaler, InpaintFill, ResizeMode, hires_size
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.input_images import InputImage
from sdxl_refinery.limits import Limits, enforce_limits
from sdxl_refinery.png import a1111_parameters, parse_parameters
from sdxl_refinery.request import GenerationRequest
from sdxl_refinery.steps import plan_steps


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_init_image_sets_the_size_and_travels_as_a_data_url() -> None:
    image = Image.new("RGB", (300, 203), "red")
    request = GenerationRequest(prompt="x", init_image=image)
    assert (request.width, request.height) == (296, 200)  # floored to multiples of 8
    payload = request.model_dump_json()
    assert "data:image/png;base64," in payload
    again = GenerationRequest.model_validate_json(payload)
    assert again == request and again.init_image is not None and again.init_image.open().size == (300, 203)
    recorded = request.recorded()["init_image"]
    assert recorded == {"sha256": request.init_image.sha256, "width": 300, "height": 203}  # type: ignore[union-attr]
    assert GenerationRequest(**request.recorded()).missing_images == ["init_image"]
    big = GenerationRequest(prompt="x", init_image=Image.new("L", (4096, 2048)))
    assert (big.width, big.height) == (4096, 2048)
    wide = GenerationRequest(prompt="x", init_image=Image.new("L", (8000, 1000)))  # 8 M pixels: scaled into 4096
    assert (wide.width, wide.height) == (4096, 512)


def test_every_form_of_an_image_reads_the_same(tmp_path: Path) -> None:
    image = Image.new("RGB", (64, 48), (1, 2, 3))
    data = png_bytes(image)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    text = base64.b64encode(data).decode()
    forms = [image, data, path, text, "data:image/png;base64," + text, {"sha256": "ab" * 32, "width": 1, "height": 1}]
    hashes = {GenerationRequest(prompt="x", init_image=form).init_image.sha256 for form in forms[:5]}  # type: ignore[union-attr]
    assert len(hashes) == 1 and InputImage.from_bytes(data).matches(InputImage.from_path(path))
    assert GenerationRequest(prompt="x", init_image=forms[5], width=64, height=64).missing_images == ["init_image"]


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"init_image": "photo.png"}, "init_image", "pass a pathlib.Path"),  # text is never a path
        ({"init_image": "/etc/hostname"}, "init_image", "not base64"),
        ({"init_image": b"GIF89a broken"}, "init_image", "not a readable image"),
        ({"init_image": png_bytes(Image.new("L", (5000, 4000)))}, "init_image", "at most 16777216 pixels"),
        ({"mask_image": Image.new("L", (8, 8))}, "mask_image", "needs an init_image"),
        ({"init_image": Image.new("L", (64, 64)), "enable_hr": True}, "enable_hr", "text to image"),
        ({"init_image": Image.new("L", (64, 64)), "strength": 0.01}, "strength", "runs no step"),
        ({"strength": 1.01}, "strength", "less than or equal to 1"),
        ({"enable_hr": True, "hr_scale": 4.5}, "hr_scale", "less than or equal to 4"),
        ({"enable_hr": True, "hr_scale": 3, "width": 2048, "height": 2048}, "hr_scale", "6144x6144"),
        ({"mask_blur": 65}, "mask_blur", "less than or equal to 64"),
        ({"resize_mode": 3}, "resize_mode", "Just resize"),
    ],
)
def test_bad_edit_fields_name_the_field_and_the_rule(fields: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(prompt="x", **fields)
    assert caught.value.field == field and words in caught.value.rule


def test_a1111_numbers_and_words_pick_the_same_choices() -> None:
    assert ResizeMode(1) is ResizeMode("crop and resize") is ResizeMode.CROP_AND_RESIZE
    assert InpaintFill("2") is InpaintFill.LATENT_NOISE and InpaintFill(0) is InpaintFill.FILL
    assert HiresUpscaler("latent (nearest-exact)").interpolation == ("nearest-exact", False)
    assert hires_size(512, 768, 1.5, 0, 0) == (768, 1152)
    assert hires_size(512, 768, 2, 1000, 0) == (1000, 1496)  # aspect kept, floored to 8
    assert hires_size(512, 768, 2, 0, 1000) == (664, 1000)
    assert hires_size(512, 768, 2, 1024, 1024) == (1024, 1024)


def test_the_plan_counts_steps_times_strength_and_both_hires_passes() -> None:
    image = Image.new("RGB", (64, 64))
    plan = plan_steps(GenerationRequest(prompt="x", init_image=image, strength=0.6, num_inference_steps=10))
    assert (plan.base_steps, plan.first_pass_steps, plan.refiner_steps) == (6, 0, 30)
    hires = GenerationRequest(prompt="x", enable_hr=True, strength=0.5, num_inference_steps=20, hr_second_pass_steps=8)
    plan = plan_steps(hires)
    assert (plan.base_steps, plan.first_pass_steps, plan.second_pass_steps, plan.base_schedule) == (24, 20, 4, 8)
    handoff = GenerationRequest(prompt="x", init_image=image, strength=0.5, num_inference_steps=20, mode="handoff",
                                switch_at=0.8)  # fmt: skip
    plan = plan_steps(handoff)
    assert (plan.base_steps, plan.refiner_steps) == (6, 4)  # the last 10 of 20 steps; the switch takes the last 4


def test_server_caps_apply_to_the_hires_size() -> None:
    request = GenerationRequest(prompt="x", enable_hr=True, width=1024, height=1024, hr_scale=2)
    with pytest.raises(InvalidRequest, match="1024x1024") as caught:
        enforce_limits(request, Limits(max_width=1024, max_height=1024))
    assert caught.value.field == "hr_scale"


def test_parameters_text_records_the_edit_and_reads_back() -> None:
    image = Image.new("RGB", (64, 64))
    request = GenerationRequest(prompt="a boat", init_image=image, mask_image=image, strength=0.4, mask_blur=6,
                                inpainting_fill="latent noise", seed=1)  # fmt: skip
    metadata = {"request": request.recorded(), "seeds": [1], "refined": True, "precision": "fp32", "device": "cpu"}
    text = a1111_parameters(metadata)
    for part in ("Denoising strength: 0.4", "Mask blur: 6", "Masked content: latent noise",
                 f"Init image hash: {request.init_image.sha256[:12]}"):  # type: ignore[union-attr]  # fmt: skip
        assert part in text
    assert "Hires" not in text and "Resize mode" not in text
    fields = parse_parameters(text)
    assert (fields["strength"], fields["mask_blur"], fields["inpainting_fill"]) == ("0.4", "6", "latent noise")
    hires = GenerationRequest(prompt="a boat", enable_hr=True, hr_scale=1.5, hr_second_pass_steps=12, seed=1)
    text = a1111_parameters({**metadata, "request": hires.recorded()})
    assert "Hires upscale: 1.5, Hires upscaler: Latent, Hires steps: 12" in text and "Mask blur" not in text
