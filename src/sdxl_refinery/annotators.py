"""The annotator folder: weights of the preprocessors that are models (depth and pose estimation), judged
without loading them.

Each such preprocessor, by A1111's module name, is a folder `<annotators>/<module>` holding transformers
models as the Hub ships them (`config.json`, `model.safetensors`, `preprocessor_config.json`): a depth
preprocessor, one depth-estimation model (such as `Intel/dpt-hybrid-midas` for `depth_midas` or
`depth-anything/Depth-Anything-V2-Small-hf` for `depth_anything_v2`); `openpose`, a person detector in
`openpose/detector` (such as `PekingU/rtdetr_r50vd_coco_o365`) and a VitPose model in `openpose/pose` (such
as `usyd-community/vitpose-base-simple`). Nothing is downloaded: a missing folder is refused naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .control import DEPTH_PREPROCESSORS, MODEL_PREPROCESSORS, Preprocessor
from .errors import InvalidRequest

# The model each depth preprocessor is made with in A1111's ControlNet extension, as a transformers folder.
SUGGESTED = {"depth_midas": "Intel/dpt-hybrid-midas", "depth_anything": "LiheYoung/depth-anything-small-hf",
             "depth_anything_v2": "depth-anything/Depth-Anything-V2-Small-hf",
             "depth_zoe": "Intel/zoedepth-nyu-kitti",
             "openpose": "PekingU/rtdetr_r50vd_coco_o365 in openpose/detector and usyd-community/vitpose-base-simple "
                         "in openpose/pose"}  # fmt: skip
# transformers' depth-estimation architectures (AutoModelForDepthEstimation), and those whose output is a
# distance (far is large) rather than MiDaS's inverse depth (near is large), which ControlNet depth maps use.
DEPTH_TYPES = ("dpt", "depth_anything", "zoedepth", "glpn", "depth_pro")
METRIC_TYPES = ("zoedepth", "glpn", "depth_pro")
# transformers' object detectors (AutoModelForObjectDetection) that can find people for VitPose.
DETECTOR_TYPES = ("rt_detr", "rt_detr_v2", "d_fine", "detr", "deformable_detr", "conditional_detr", "yolos")
WEIGHTS = "model.safetensors"


def is_metric(config: dict[str, Any]) -> bool:
    """Whether a depth model's output grows with distance (to be inverted into a ControlNet depth map)."""
    return config.get("model_type") in METRIC_TYPES or config.get("depth_estimation_type") == "metric"


def _model_reason(folder: Path, types: tuple[str, ...], kind: str) -> str | None:
    """Why `folder` is not a usable transformers model folder of one of `types` (None: it is)."""
    if not folder.is_dir():
        return f"there is no folder {folder}"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{folder / 'config.json'} is not readable ({error.__class__.__name__})"
    if not isinstance(config, dict) or config.get("model_type") not in types:
        found = config.get("model_type") if isinstance(config, dict) else None
        return f"{folder} holds a {found!r} model, not {kind} ({', '.join(types)})"
    for needed in (WEIGHTS, "preprocessor_config.json"):
        if not (folder / needed).is_file():
            return f"{folder} has no {needed}"
    if kind == "a person detector" and "person" not in {str(label).lower() for label in
                                                         (config.get("id2label") or {}).values()}:  # fmt: skip
        return f"{folder}'s detector has no 'person' label"
    return None


def _reason(name: str, folder: Path) -> str | None:
    """Why `folder` cannot run the preprocessor `name` (None: it can)."""
    if name in DEPTH_PREPROCESSORS:
        return _model_reason(folder, DEPTH_TYPES, "a depth-estimation model")
    return (_model_reason(folder / "detector", DETECTOR_TYPES, "a person detector")
            or _model_reason(folder / "pose", ("vitpose",), "a VitPose model"))  # fmt: skip


class AnnotatorFolder:
    """The annotator folder (`REFINERY_ANNOTATOR_DIR`): one folder per preprocessor that needs models."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def check(self, preprocessor: Preprocessor, field: str) -> Path | None:
        """The model folder `preprocessor` runs with (None for pure image processing).

        Raises:
            InvalidRequest: naming `field`: the preprocessor's folder is missing or holds other models, naming
                the folder to fill and models to fill it with.
        """
        if preprocessor.value not in MODEL_PREPROCESSORS:
            return None
        name = preprocessor.value
        if self.folder is None:
            raise InvalidRequest(field, f"{name!r} needs annotator weights and no annotator folder is set "
                                        "(REFINERY_ANNOTATOR_DIR)")  # fmt: skip
        folder = self.folder / name
        reason = _reason(name, folder)
        if reason is not None:
            raise InvalidRequest(field, f"{name!r} needs annotator weights: {reason}; put transformers models "
                                        f"there ({SUGGESTED[name]})")  # fmt: skip
        return folder

    def runnable(self) -> list[str]:
        """Every preprocessor a unit may name now: the image-processing ones and the model ones that are ready."""
        ready = self.ready()
        return [member.value for member in Preprocessor if member.value not in MODEL_PREPROCESSORS or
                member.value in ready]  # fmt: skip

    def ready(self) -> list[str]:
        """The model preprocessors whose folders are usable now."""
        return [name for name, reason in self.reasons().items() if reason is None]

    def reasons(self) -> dict[str, str | None]:
        """Each model preprocessor: None when its folder is usable, else why not (what to put where)."""
        if self.folder is None:
            return dict.fromkeys(MODEL_PREPROCESSORS, "no annotator folder is set (REFINERY_ANNOTATOR_DIR)")
        found = {name: _reason(name, self.folder / name) for name in MODEL_PREPROCESSORS}
        return {name: f"{reason}; put transformers models there ({SUGGESTED[name]})" if reason else None
                for name, reason in found.items()}  # fmt: skip
