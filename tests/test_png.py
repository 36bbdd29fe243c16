"""PNG files carry their recipe and are written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from sdxl_refinery import GenerationRequest, ImageService, StorageError
from sdxl_refinery.png import a1111_parameters, parse_parameters, read_metadata, write_png
from sdxl_refinery.request import REQUEST_FIELDS

from .conftest import SMALL


async def test_metadata_round_trip_reproduces_the_image(service: ImageService, tmp_path: Path) -> None:
    request = GenerationRequest(
        prompt="a blue bird", negative_prompt="blurry", num_inference_steps=5, refiner_steps=3, seed=77, **SMALL
    )
    result = await service.generate(request, output_path=tmp_path / "bird.png")
    metadata = read_metadata(tmp_path / "bird.png")
    assert metadata["seeds"] == [77]
    again = GenerationRequest(**metadata["request"])
    assert again == request
    rerun = await service.generate(again)
    with Image.open(tmp_path / "bird.png") as saved:
        assert list(saved.convert("RGB").getdata()) == list(rerun.images[0].getdata())
    parameters = metadata["parameters"]
    lines = parameters.splitlines()
    assert lines[0] == "a blue bird" and lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith(
        "Steps: 5, Sampler: Euler, Schedule type: Automatic, CFG scale: 8.0, Seed: 77, Size: 256x256, "
    )
    assert "Refiner: refiner" in lines[2] and "Refiner steps: 3" in lines[2]
    assert result.paths == [str(tmp_path / "bird.png")]


def test_failed_write_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    metadata = {
        "request": GenerationRequest(prompt="x").model_dump(mode="json"),
        "seeds": [1],
        "base_steps": 1,
        "refiner_steps": 0,
        "refined": False,
        "precision": "fp32",
        "device": "cpu",
    }
    with pytest.raises(StorageError, match="No space left on device"):
        write_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", metadata)
    assert list(tmp_path.iterdir()) == []


def test_parameters_text_without_refinement_names_no_refiner() -> None:
    metadata = {
        "request": GenerationRequest(prompt="x", seed=3).model_dump(mode="json"),
        "seeds": [3],
        "base_steps": 50,
        "refiner_steps": 0,
        "refined": False,
        "precision": "bf16",
        "device": "cpu",
        "models": {"base": "sdxl", "refiner": "ref"},
    }
    text = a1111_parameters(metadata)
    assert "Refiner" not in text and text.splitlines()[1].startswith("Steps: 50")


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a cat, on a mat: at noon", "negative_prompt": "blur", "width": 1152, "height": 896, "seed": 9},
        {"prompt": "two\nlines", "mode": "handoff", "switch_at": 0.7, "num_inference_steps": 40, "seed": 3},
        {"prompt": "plain", "use_refinement": False, "guidance_scale": 5.5, "seed": 0},
        {
            "prompt": "x",
            "sampler": "DPM++ 2M SDE",
            "scheduler": "Exponential",
            "refiner_sampler": "Euler a",
            "refiner_scheduler": "SGM Uniform",
            "clip_skip": 2,
            "seed": 5,
        },
    ],
)
def test_parameters_text_reads_back_through_the_table(fields: dict[str, object]) -> None:
    """What the table labels write, `parse_parameters` reads back to the same request fields."""
    request = GenerationRequest(**fields)  # type: ignore[arg-type]
    metadata = {"request": request.model_dump(mode="json"), "seeds": [request.seed], "refined": request.use_refinement,
                "precision": "fp32", "device": "cpu", "models": {"base": "base", "base_hash": "abc"}}  # fmt: skip
    parsed = parse_parameters(a1111_parameters(metadata))
    written = {name for name in parsed if name not in ("prompt", "negative_prompt")}
    assert written, "no labelled field came back"
    again = GenerationRequest(**{**fields, **parsed})  # type: ignore[arg-type]
    assert again == request
    labelled = {spec.name for spec in REQUEST_FIELDS if spec.faces.label} - request.inactive_fields()
    assert written == labelled


def test_pngs_follow_the_umask_like_any_new_file(tmp_path: Path) -> None:
    """mkstemp creates 0600; an image is meant to be shared, so it gets what open() would give it."""
    metadata = {"request": GenerationRequest(prompt="x").model_dump(mode="json"), "seeds": [1], "base_steps": 1,
                "refiner_steps": 1, "refined": True, "precision": "fp32", "device": "cpu"}  # fmt: skip
    previous = os.umask(0o022)
    try:
        shared = write_png(Image.new("RGB", (8, 8)), tmp_path / "shared.png", metadata)
        os.umask(0o077)
        private = write_png(Image.new("RGB", (8, 8)), tmp_path / "private.png", metadata)
    finally:
        os.umask(previous)
    assert shared.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600
