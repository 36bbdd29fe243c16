"""IP-Adapters in the engine, for one run: loaded into the base as diffusers' `load_ip_adapter` loads them,
and taken out after, the UNet's own attention processors put back (fused ones included).

The refiner runs without them, as with ControlNet: its UNet is another architecture, for which SDXL
IP-Adapters have no weights. Each run with image prompts loads its adapters (small next to the encoder); the
image encoder (a CLIP vision model of 0.6 to 1.8 billion parameters) is kept between runs, the last one used.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .meta_race import built_off_meta, on_meta


class ImageEncoders:
    """The image encoder of the last run with image prompts, by its folder and the pipeline's dtype and device
    (a run in another dtype, such as the fp32 retry, loads its own)."""

    def __init__(self) -> None:
        self._kept: tuple[tuple[Path, str], Any] | None = None

    def lend(self, pipe: Any, folder: Path) -> None:
        """Register the kept encoder of `folder` in `pipe` when there is one (then diffusers loads none)."""
        key = (folder, f"{pipe.dtype}@{pipe.device}")
        if self._kept is not None and self._kept[0] == key:
            pipe.register_modules(image_encoder=self._kept[1])

    def keep(self, pipe: Any, folder: Path) -> None:
        """Keep `pipe`'s encoder (loaded from `folder`) for the next run."""
        self._kept = ((folder, f"{pipe.dtype}@{pipe.device}"), pipe.image_encoder)


@contextlib.contextmanager
def ip_adapters_applied(pipe: Any, files: list[Path], weights: list[float],
                        encoders: ImageEncoders | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The adapters in `pipe`'s UNet (scales `weights`) for the length of the block, which gets nothing to add
    to the pipeline's arguments but the images (`ip_adapter_image`); no adapters: nothing happens. The image
    encoder (one for all, in `image_encoder` beside the files: the folder's check) comes from `encoders` when
    it holds it, and is kept there after.

    Raises:
        ModelLoadError: the adapters or their encoder kept meta tensors however often they were loaded (other
            threads' loads meanwhile: `meta_race`).
    """
    if not files:
        yield {}
        return
    unet = pipe.unet
    own_processors = dict(unet.attn_processors)
    encoder_folder = files[0].parent / "image_encoder"
    if encoders is not None:
        encoders.lend(pipe, encoder_folder)

    def load() -> Any:
        if getattr(pipe, "image_encoder", None) is not None and on_meta([pipe.image_encoder, unet]):
            pipe.unload_ip_adapter()  # an attempt that another thread's load left on the meta device
            unet.set_attn_processor(own_processors)
        pipe.load_ip_adapter([str(path.parent) for path in files], subfolder=[""] * len(files),
                             weight_name=[path.name for path in files], image_encoder_folder="image_encoder",
                             local_files_only=True)  # fmt: skip
        return pipe

    try:
        built_off_meta(load, lambda loaded: [loaded.image_encoder, unet],
                       lambda reason: ModelLoadError(f"IP-Adapters could not be loaded ({reason})"))  # fmt: skip
        if encoders is not None:
            encoders.keep(pipe, encoder_folder)
        pipe.set_ip_adapter_scale(weights)
        yield {"image_encoder": pipe.image_encoder, "feature_extractor": pipe.feature_extractor}
    finally:
        pipe.unload_ip_adapter()
        unet.set_attn_processor(own_processors)
