"""IP-Adapters in the engine, for one run: loaded into the base as diffusers' `load_ip_adapter` loads them,
and taken out after, the UNet's own attention processors put back (fused ones included).

The refiner runs without them, as with ControlNet: its UNet is another architecture, for which SDXL
IP-Adapters have no weights. Each run with image prompts loads its adapters and their image encoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def ip_adapters_applied(pipe: Any, files: list[Path], weights: list[float]) -> Iterator[dict[str, Any]]:
    """The adapters in `pipe`'s UNet (scales `weights`) for the length of the block, which gets nothing to add
    to the pipeline's arguments but the images (`ip_adapter_image`); no adapters: nothing happens."""
    if not files:
        yield {}
        return
    unet = pipe.unet
    own_processors = dict(unet.attn_processors)
    pipe.load_ip_adapter([str(path.parent) for path in files], subfolder=[""] * len(files),
                         weight_name=[path.name for path in files], image_encoder_folder="image_encoder",
                         local_files_only=True)  # fmt: skip
    try:
        pipe.set_ip_adapter_scale(weights)
        yield {"image_encoder": pipe.image_encoder, "feature_extractor": pipe.feature_extractor}
    finally:
        pipe.unload_ip_adapter()
        unet.set_attn_processor(own_processors)
