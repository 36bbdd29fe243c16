"""The openpose preprocessor: people found by a transformers object detector, their body keypoints estimated
by VitPose (transformers), drawn as the OpenPose skeleton that SDXL pose ControlNets were trained on.

VitPose gives COCO's 17 keypoints per person; OpenPose's 18 add the neck (the shoulders' midpoint, when both
are seen). The drawing is OpenPose's (and A1111's ControlNet extension's): each limb an ellipse 4 pixels
wide in its colour at 60 %, each keypoint a disc of radius 4 in its full colour, on black.
"""

from __future__ import annotations

import functools
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import ModelLoadError
from .meta_race import built_off_meta

PERSON_THRESHOLD = 0.3  # a detection's score to count as a person (transformers' VitPose example)
KEYPOINT_THRESHOLD = 0.3  # a keypoint's score to be drawn (DWPose's visibility threshold)
STICK_WIDTH = 4
# OpenPose's 18 keypoints as COCO indices; None: the neck, made from both shoulders (COCO 5 and 6).
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))  # fmt: skip
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))  # fmt: skip

Point = tuple[float, float]
_loading = threading.Lock()


def openpose_points(keypoints: np.ndarray, scores: np.ndarray) -> list[Point | None]:
    """One person's 18 OpenPose keypoints from COCO's 17 (x, y) and their scores; None where not seen."""
    seen = [(float(x), float(y)) if score >= KEYPOINT_THRESHOLD else None
            for (x, y), score in zip(keypoints, scores, strict=True)]  # fmt: skip
    left, right = seen[5], seen[6]
    neck = ((left[0] + right[0]) / 2, (left[1] + right[1]) / 2) if left and right else None
    return [neck if index is None else seen[index] for index in OPENPOSE_FROM_COCO]


def draw_openpose(people: list[list[Point | None]], width: int, height: int) -> Image.Image:
    """The OpenPose drawing of `people` (18 keypoints each, pixels) on a black `width` x `height` canvas."""
    import cv2

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for points in people:
        for (first, second), colour in zip(LIMBS, COLOURS, strict=False):
            start, end = points[first], points[second]
            if start is None or end is None:
                continue
            length = math.hypot(start[0] - end[0], start[1] - end[1])
            angle = math.degrees(math.atan2(start[1] - end[1], start[0] - end[0]))
            middle = (int((start[0] + end[0]) / 2), int((start[1] + end[1]) / 2))
            polygon = cv2.ellipse2Poly(middle, (int(length / 2), STICK_WIDTH), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, np.asarray(polygon, dtype=np.int32), [int(channel * 0.6) for channel in colour])
        for point, colour in zip(points, COLOURS, strict=True):
            if point is not None:
                cv2.circle(canvas, (int(point[0]), int(point[1])), 4, colour, thickness=-1)
    return Image.fromarray(canvas)


@functools.lru_cache(maxsize=2)  # the previews' CPU copy and the engine device's
def _models(folder: Path, device: str) -> tuple[Any, Any, Any, Any]:
    """The detector's and VitPose's processors and models of an openpose annotator folder, loaded once.

    Raises:
        ModelLoadError: a model kept meta tensors however often it was built (other threads' loads).
    """
    from transformers import AutoImageProcessor, AutoModelForObjectDetection, VitPoseForPoseEstimation

    def loaded(kind: Any, part: str) -> Any:
        model = built_off_meta(
            lambda: kind.from_pretrained(folder / part, local_files_only=True),
            lambda built: [built],
            lambda reason: ModelLoadError(f"{folder / part} could not be built ({reason})"),
        )
        return model.to(device).eval()

    return (AutoImageProcessor.from_pretrained(folder / "detector", local_files_only=True),
            loaded(AutoModelForObjectDetection, "detector"),
            AutoImageProcessor.from_pretrained(folder / "pose", local_files_only=True),
            loaded(VitPoseForPoseEstimation, "pose"))  # fmt: skip


def people_in(image: Image.Image, folder: Path, device: str = "cpu") -> list[list[Point | None]]:
    """Each person's OpenPose keypoints in `image`: 1. person boxes, 2. COCO keypoints per box, 3. OpenPose's."""
    with _loading:
        detector_processor, detector, pose_processor, pose = _models(folder, device)
    size = [(image.height, image.width)]
    with torch.inference_mode():
        found = detector(**detector_processor(images=image, return_tensors="pt").to(device))
    detections = detector_processor.post_process_object_detection(found, target_sizes=size,
                                                                  threshold=PERSON_THRESHOLD)[0]  # fmt: skip
    person = {label.lower(): index for index, label in detector.config.id2label.items()}["person"]
    boxes = detections["boxes"][detections["labels"] == person].float().cpu().numpy()
    if not len(boxes):
        return []
    boxes[:, 2:] -= boxes[:, :2]  # VitPose takes COCO boxes: x, y, width, height
    with torch.inference_mode():
        estimated = pose(**pose_processor(image, boxes=[boxes], return_tensors="pt").to(device))
    results = pose_processor.post_process_pose_estimation(estimated, boxes=[boxes])[0]
    return [openpose_points(result["keypoints"].cpu().numpy(), result["scores"].cpu().numpy()) for result in results]


def pose_map(image: Image.Image, folder: Path, device: str = "cpu") -> Image.Image:
    """The OpenPose skeletons of the people in `image`, drawn at its size."""
    return draw_openpose(people_in(image, folder, device), image.width, image.height)
