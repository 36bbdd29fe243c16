"""The annotator folder: weights of the preprocessors that are models (depth estimation), judged without
loading them.

Each such preprocessor, by A1111's module name, is a folder `<annotators>/<module>` holding a transformers
depth-estimation model as the Hub ships it (`config.json`, `model.safetensors`, `preprocessor_config.json`),
for example `Intel/dpt-hybrid-midas` for `depth_midas` or `depth-anything/Depth-Anything-V2-Small-hf` for
`depth_anything_v2`. Nothing is downloaded: a missing folder is refused naming the folder to fill.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .control import DEPTH_PREPROCESSORS, Preprocessor
from .errors import InvalidRequest

# The model each depth preprocessor is made with in A1111's ControlNet extension, as a transformers folder.
SUGGESTED = {"depth_midas": "Intel/dpt-hybrid-midas", "depth_anything": "LiheYoung/depth-anything-small-hf",
             "depth_anything_v2": "depth-anything/Depth-Anything-V2-Small-hf",
             "depth_zoe": "Intel/zoedepth-nyu-kitti"}  # fmt: skip
# transformers' depth-estimation architectures (AutoModelForDepthEstimation), and those whose output is a
# distance (far is large) rather than MiDaS's inverse depth (near is large), which ControlNet depth maps use.
DEPTH_TYPES = ("dpt", "depth_anything", "zoedepth", "glpn", "depth_pro")
METRIC_TYPES = ("zoedepth", "glpn", "depth_pro")
WEIGHTS = "model.safetensors"


def is_metric(config: dict[str, Any]) -> bool:
    """Whether a depth model's output grows with distance (to be inverted into a ControlNet depth map)."""
    return config.get("model_type") in METRIC_TYPES or config.get("depth_estimation_type") == "metric"


def _reason(folder: Path) -> str | None:
    """Why `folder` is not a usable depth-estimation model folder (None: it is)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"{folder / 'config.json'} is not readable ({error.__class__.__name__})"
    if not isinstance(config, dict) or config.get("model_type") not in DEPTH_TYPES:
        kind = config.get("model_type") if isinstance(config, dict) else None
        return f"{folder} holds a {kind!r} model, not a depth-estimation model ({', '.join(DEPTH_TYPES)})"
    for needed in (WEIGHTS, "preprocessor_config.json"):
        if not (folder / needed).is_file():
            return f"{folder} has no {needed}"
    return None


class AnnotatorFolder:
    """The annotator folder (`REFINERY_ANNOTATOR_DIR`): one model folder per preprocessor that needs one."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def check(self, preprocessor: Preprocessor, field: str) -> Path | None:
        """The model folder `preprocessor` runs with (None for pure image processing).

        Raises:
            InvalidRequest: naming `field`: the preprocessor's folder is missing or not a depth model, naming
                the folder to fill and a model to fill it with.
        """
        if preprocessor.value not in DEPTH_PREPROCESSORS:
            return None
        name = preprocessor.value
        if self.folder is None:
            raise InvalidRequest(field, f"{name!r} needs annotator weights and no annotator folder is set "
                                        "(REFINERY_ANNOTATOR_DIR)")  # fmt: skip
        folder = self.folder / name
        reason = _reason(folder) if folder.is_dir() else f"there is no folder {folder}"
        if reason is not None:
            raise InvalidRequest(field, f"{name!r} needs annotator weights: {reason}; put a transformers "
                                        f"depth-estimation model there (such as {SUGGESTED[name]})")  # fmt: skip
        return folder

    def ready(self) -> list[str]:
        """The depth preprocessors whose folders are usable now."""
        if self.folder is None:
            return []
        return [name for name in DEPTH_PREPROCESSORS
                if (self.folder / name).is_dir() and _reason(self.folder / name) is None]  # fmt: skip
