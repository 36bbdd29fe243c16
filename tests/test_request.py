"""Every bad input is refused before any work, naming the field and the rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdxl_refinery import GenerationRequest, ImageService, InvalidRequest
from sdxl_refinery.request import validate_device, validate_precision

BAD_FIELDS = [
    ("prompt", ""),
    ("prompt", "   \n\t"),
    ("width", 1001),
    ("width", 56),
    ("width", 4104),
    ("height", 100),
    ("num_inference_steps", 0),
    ("num_inference_steps", 501),
    ("refiner_steps", 0),
    ("refiner_steps", 501),
    ("refiner_strength", 0.0),
    ("refiner_strength", 1.01),
    ("switch_at", 0.0),
    ("switch_at", 1.0),
    ("guidance_scale", -0.1),
    ("guidance_scale", 30.5),
    ("n", 0),
    ("n", 17),
    ("mode", "turbo"),
    ("seed", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_bad_field_raises_value_error_naming_the_field(field: str, value: object) -> None:
    fields = {"prompt": "a cat", field: value}
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(**fields)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_unknown_field_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="colour: is not a known field"):
        GenerationRequest(prompt="x", colour="red")


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "", "tpu"])
def test_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(InvalidRequest, match="^device: "):
        validate_device(device)
    with pytest.raises(InvalidRequest, match="^device: "):
        ImageService("tiny", "tiny", device=device)


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="^precision: must be one of auto, full, half, bf16"):
        validate_precision("fp8")


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
async def test_generate_image_returns_false_and_writes_nothing(
    service: ImageService, tmp_path: Path, field: str, value: object
) -> None:
    fields = {"width": 256, "height": 256, field: value}
    prompt = fields.pop("prompt", "a cat")
    assert await service.generate_image(prompt=prompt, output_path=tmp_path / "x.png", **fields) is False
    assert list(tmp_path.iterdir()) == []


async def test_unwritable_output_folder_is_refused_before_work(service: ImageService, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert await service.generate_image("a cat", blocker / "sub" / "x.png", width=256, height=256) is False
    assert blocker.read_text() == "not a folder"


@given(
    width=st.integers(-10_000, 10_000),
    steps=st.integers(-10, 1000),
    strength=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_request_is_either_valid_or_refused_with_a_field(width: int, steps: int, strength: float) -> None:
    try:
        request = GenerationRequest(prompt="x", width=width, num_inference_steps=steps, refiner_strength=strength)
    except InvalidRequest as error:
        assert error.field in {"width", "num_inference_steps", "refiner_strength"}
    else:
        assert 64 <= request.width <= 4096 and request.width % 8 == 0
        assert 1 <= request.num_inference_steps <= 500
        assert 0 < request.refiner_strength <= 1


def test_a_refiner_strength_too_small_for_any_schedule_is_refused() -> None:
    """30 refiner steps at strength 1e-300 would need a schedule of 3e301 steps (it used to overflow)."""
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(prompt="x", refiner_strength=1e-300)
    assert caught.value.field == "refiner_strength" and "at most 1000" in caught.value.rule
    assert GenerationRequest(prompt="x", refiner_strength=0.03).refiner_strength == 0.03  # 1000 steps: allowed
