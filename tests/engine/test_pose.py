"""The openpose preprocessor: OpenPose's drawing of known skeletons, and a tiny random-weight RT-DETR person
detector and VitPose (transformers) in the annotator folder finding the keypoints transformers finds when
driven by hand, drawn into the map a pose ControlNet unit uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForObjectDetection,
    RTDetrConfig,
    RTDetrForObjectDetection,
    RTDetrImageProcessor,
    RTDetrResNetConfig,
    VitPoseBackboneConfig,
    VitPoseConfig,
    VitPoseForPoseEstimation,
    VitPoseImageProcessor,
)

from sdxl_refinery import ImageService
from sdxl_refinery.annotators import AnnotatorFolder
from sdxl_refinery.control import Preprocessor
from sdxl_refinery.controlnets import ControlNetFolder
from sdxl_refinery.engine.pose import COLOURS, draw_openpose, openpose_points, people_in, pose_map
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.png import a1111_parameters

from .test_annotators import photo, preprocessed_equals_ready_made
from .test_controlnet import _tiny_controlnet


def write_tiny_openpose(folder: Path) -> Path:
    """A person detector (RT-DETR) and a VitPose with random weights; the detector's person score and
    VitPose's heatmaps are lifted so that people and keypoints are found (trained models find them)."""
    torch.manual_seed(0)
    backbone = RTDetrResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                  layer_type="basic", out_features=["stage2", "stage3", "stage4"])  # fmt: skip
    detector = RTDetrForObjectDetection(RTDetrConfig(
        backbone_config=backbone, encoder_hidden_dim=16, encoder_in_channels=[16, 32, 64], d_model=16,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        decoder_layers=1, encoder_layers=1, num_queries=4, decoder_in_channels=[16, 16, 16], num_labels=2,
        id2label={0: "person", 1: "cat"}, label2id={"person": 0, "cat": 1}, num_denoising=0))  # fmt: skip
    with torch.no_grad():
        for head in [*detector.model.decoder.class_embed, detector.model.enc_score_head]:
            head.bias[0] += 6.0
    detector.save_pretrained(folder / "detector")
    RTDetrImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder / "detector")
    backbone_config = VitPoseBackboneConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=37, image_size=[64, 48], patch_size=[16, 16],
                                            out_indices=[2])  # fmt: skip
    pose = VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone_config, num_labels=17))
    with torch.no_grad():
        pose.head.conv.bias += 1.0
    pose.save_pretrained(folder / "pose")
    VitPoseImageProcessor(size={"height": 64, "width": 48}).save_pretrained(folder / "pose")
    return folder


@pytest.fixture(scope="module")
def annotators(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pose-annotators")
    write_tiny_openpose(root / "openpose")
    return root


def test_openpose_keypoints_add_the_neck_and_drop_unseen_points() -> None:
    keypoints = np.array([[10.0 + index, 20.0 + index] for index in range(17)])
    scores = np.full(17, 0.9)
    scores[9] = 0.1  # COCO's left wrist is OpenPose's 7
    points = openpose_points(keypoints, scores)
    assert points[0] == (10.0, 20.0) and points[7] is None
    assert points[1] == ((15.0 + 16.0) / 2, (25.0 + 26.0) / 2)  # between COCO's shoulders 5 and 6
    assert points[2] == (16.0, 26.0) and points[5] == (15.0, 25.0)  # right shoulder is COCO 6, left is 5


def test_the_drawing_is_openposes() -> None:
    points: list[tuple[float, float] | None] = [None] * 18
    points[1], points[2] = (10.0, 30.0), (50.0, 30.0)  # neck and right shoulder: limb 0, red
    drawn = np.asarray(draw_openpose([points], 64, 48))
    assert tuple(drawn[30, 30]) == (153, 0, 0)  # the limb, at 60 % of its colour
    assert tuple(drawn[30, 50]) == COLOURS[2] and tuple(drawn[30, 10]) == COLOURS[1]  # the keypoints
    assert tuple(drawn[10, 30]) == (0, 0, 0) and drawn.shape == (48, 64, 3)


def by_hand(image: Image.Image, folder: Path) -> list[np.ndarray]:
    """transformers' VitPose example: people boxes from the detector, keypoints per box (COCO's 17)."""
    detector_processor = AutoImageProcessor.from_pretrained(folder / "detector")
    detector = AutoModelForObjectDetection.from_pretrained(folder / "detector").eval()
    pose_processor = AutoImageProcessor.from_pretrained(folder / "pose")
    pose = VitPoseForPoseEstimation.from_pretrained(folder / "pose").eval()
    with torch.no_grad():
        found = detector(**detector_processor(images=image, return_tensors="pt"))
    result = detector_processor.post_process_object_detection(found, target_sizes=[(image.height, image.width)],
                                                              threshold=0.3)[0]  # fmt: skip
    boxes = result["boxes"][result["labels"] == 0].numpy()
    boxes[:, 2] -= boxes[:, 0]
    boxes[:, 3] -= boxes[:, 1]
    with torch.no_grad():
        estimated = pose(**pose_processor(image, boxes=[boxes], return_tensors="pt"))
    return [
        person["keypoints"].numpy()
        for person in pose_processor.post_process_pose_estimation(estimated, boxes=[boxes])[0]
    ]


def test_people_are_found_as_transformers_finds_them(annotators: Path) -> None:
    found = people_in(photo(), annotators / "openpose")
    expected = by_hand(photo(), annotators / "openpose")
    assert len(found) == len(expected) > 0
    for points, keypoints in zip(found, expected, strict=True):
        assert points[0] is not None and np.allclose(points[0], keypoints[0], atol=1e-3)  # the nose
        assert points[2] is not None and np.allclose(points[2], keypoints[6], atol=1e-3)  # the right shoulder
    drawn = np.asarray(pose_map(photo(), annotators / "openpose"))
    assert drawn.shape == (64, 64, 3) and (drawn.max(axis=-1) > 0).sum() > 50  # skeletons on black


def test_the_folder_needs_a_person_detector_and_vitpose(annotators: Path, tmp_path: Path) -> None:
    assert AnnotatorFolder(annotators).ready() == ["openpose"]
    with pytest.raises(InvalidRequest, match="no folder .*openpose/detector.*rtdetr"):
        AnnotatorFolder(tmp_path).check(Preprocessor.OPENPOSE, "controlnets.0.preprocessor")
    (tmp_path / "openpose" / "detector").mkdir(parents=True)
    (tmp_path / "openpose" / "detector" / "config.json").write_text('{"model_type": "detr", "id2label": {"0": "cat"}}')
    for name in ("model.safetensors", "preprocessor_config.json"):
        (tmp_path / "openpose" / "detector" / name).write_text("{}")
    with pytest.raises(InvalidRequest, match="no 'person' label"):
        AnnotatorFolder(tmp_path).check(Preprocessor.OPENPOSE, "controlnets.0.preprocessor")


async def test_a_pose_unit_guides_as_the_map_given_ready_made(service: ImageService, annotators: Path,
                                                              tiny_pair: tuple[Path, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    _tiny_controlnet(tiny_pair[0], 3).save_pretrained(tmp_path / "tiny-pose")
    monkeypatch.setattr(service, "controlnet_folder", ControlNetFolder(tmp_path))
    monkeypatch.setattr(service, "annotator_folder", AnnotatorFolder(annotators))
    unit = {"model": "tiny-pose", "image": photo()}
    estimated = await preprocessed_equals_ready_made(
        service, unit, "openpose", pose_map(photo(), annotators / "openpose")
    )
    assert "Module: openpose, Model: tiny-pose" in a1111_parameters(estimated.metadata())
