"""Depth preprocessors: a tiny random-weight DPT (MiDaS's architecture) in the annotator folder makes the depth
map transformers makes when driven by hand, and a unit with a depth preprocessor guides the base exactly as a
unit given that map ready-made; without the folder the request is refused naming it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForDepthEstimation,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
)

from sdxl_refinery import GenerationRequest, GenerationResult, ImageService
from sdxl_refinery.annotators import AnnotatorFolder
from sdxl_refinery.control import ControlUnit, Preprocessor
from sdxl_refinery.controlnets import ControlNetFolder
from sdxl_refinery.engine.annotators import depth_map
from sdxl_refinery.errors import InvalidRequest

from .hand_driven import PROMPT
from .test_controlnet import SIZE, STEPS, _tiny_controlnet
from .test_edits import pixels


def write_tiny_dpt(folder: Path) -> Path:
    """A DPT depth model (the architecture of Intel's MiDaS 3 models) with random weights and its processor."""
    torch.manual_seed(0)
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37, image_size=32,
                       patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 16, 32],
                       fusion_hidden_size=16, initializer_range=0.5)  # fmt: skip
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def photo() -> Image.Image:
    """A picture with structure: a bright disc over a gradient."""
    y, x = np.mgrid[0:64, 0:64]
    gray = (x * 3 + ((x - 32) ** 2 + (y - 30) ** 2 < 200) * 90).clip(0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray, 255 - gray, gray // 2], axis=-1))


@pytest.fixture(scope="module")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("annotators")
    write_tiny_dpt(root / "depth_midas")
    return root


def by_hand(image: Image.Image, folder: Path) -> np.ndarray:
    """transformers as its model cards show it: processor, model, post-processing; then near white, far black."""
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    with torch.no_grad():
        outputs = model(**processor(images=image, return_tensors="pt"))
    depth = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])[0]
    values = depth["predicted_depth"].numpy()
    return np.round((values - values.min()) / (values.max() - values.min()) * 255)


async def preprocessed_equals_ready_made(service: ImageService, unit: dict[str, Any], preprocessor: str,
                                         ready_map: Image.Image) -> GenerationResult:  # fmt: skip
    """The unit run with `preprocessor` on its image guides the base as the unit given `ready_map` does
    (within 2/255); the preprocessed run's result."""
    preprocessed = await service.generate(
        GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[{**unit, "preprocessor": preprocessor}])
    )
    given = await service.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS,
                                                     controlnets=[{**unit, "image": ready_map}]))  # fmt: skip
    assert np.abs(pixels(preprocessed.images) - pixels(given.images)).max() <= 2.0
    return preprocessed


def test_the_depth_map_is_the_models_prediction_scaled(annotators: Path) -> None:
    made = np.asarray(depth_map(photo(), annotators / "depth_midas"), dtype=np.float64)
    assert made.shape == (64, 64, 3) and np.array_equal(made[..., 0], made[..., 2])
    assert np.abs(made[..., 0] - by_hand(photo(), annotators / "depth_midas")).max() <= 1
    assert made.min() == 0 and made.max() == 255 and len(np.unique(made)) > 20


def test_the_folder_says_which_depth_preprocessors_are_ready(annotators: Path, tmp_path: Path) -> None:
    assert AnnotatorFolder(annotators).ready() == ["depth_midas"]
    with pytest.raises(InvalidRequest, match=r"depth_anything_v2.*no folder .*depth_anything_v2.*Depth-Anything-V2"):
        AnnotatorFolder(annotators).check(Preprocessor.DEPTH_ANYTHING_V2, "controlnets.0.preprocessor")
    (tmp_path / "depth_zoe").mkdir()
    (tmp_path / "depth_zoe" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InvalidRequest, match="'bert' model, not a depth-estimation model") as caught:
        AnnotatorFolder(tmp_path).check(Preprocessor.DEPTH_ZOE, "controlnets.0.preprocessor")
    assert caught.value.field == "controlnets.0.preprocessor"


def test_other_annotators_are_refused_naming_what_is_loaded() -> None:
    with pytest.raises(ValueError, match="openpose_full.*it loads depth_midas.*openpose"):
        ControlUnit(model="m", image=photo(), preprocessor="openpose_full")
    assert ControlUnit(model="m", image=photo(), preprocessor="depth").preprocessor is Preprocessor.DEPTH_MIDAS


async def test_a_depth_unit_guides_as_the_map_given_ready_made(service: ImageService, annotators: Path,
                                                               tiny_pair: tuple[Path, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _tiny_controlnet(tiny_pair[0], 2).save_pretrained(tmp_path / "tiny-depth")
    monkeypatch.setattr(service, "controlnet_folder", ControlNetFolder(tmp_path))
    monkeypatch.setattr(service, "annotator_folder", AnnotatorFolder(annotators))
    unit = {"model": "tiny-depth", "image": photo(), "weight": 0.9}
    ready_map = Image.fromarray(by_hand(photo(), annotators / "depth_midas").astype(np.uint8)).convert("RGB")
    await preprocessed_equals_ready_made(service, unit, "depth_midas", ready_map)
    preview = service.control_map(ControlUnit(**unit, preprocessor="depth_midas"), 64, 64)  # the page's preview
    assert np.abs(np.asarray(preview, dtype=np.int16) - np.asarray(ready_map, dtype=np.int16)).max() <= 1
    monkeypatch.setattr(service, "annotator_folder", AnnotatorFolder(tmp_path / "none-here"))
    with pytest.raises(InvalidRequest, match="none-here/depth_midas") as caught:
        await service.generate(
            GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[{**unit, "preprocessor": "depth_midas"}])
        )
    assert caught.value.field == "controlnets.0.preprocessor"
