"""The memory plan chosen up front from free memory, and tiled VAE decode only when a decode would not fit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from diffusers.models.attention_processor import SlicedAttnProcessor

import sdxl_refinery.engine.decode as decode_module  # imported before any test patches memory's names
from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine import memory
from sdxl_refinery.engine.memory import GIB, choose_plan, decode_bytes, unet_working_bytes

REQUEST = GenerationRequest(
    prompt="a lighthouse", width=256, height=256, num_inference_steps=4, refiner_steps=2, seed=2
)
SDXL_FP16 = int(11.5 * GIB)  # base + refiner + both encoders + VAE in fp16
SDXL_UNET_FP16 = int(4.8 * GIB)
WORKING = unet_working_bytes(1024, 1024, 1, 2)


@pytest.mark.parametrize(
    ("device", "free_gib", "expected"),
    [
        ("cuda:0", 78, "resident"),  # an H100
        ("cuda:0", 12.5, "sliced"),  # weights fit, working memory only in slices
        ("cuda:0", 10, "model-offload"),  # a 12 GiB card with a desktop on it
        ("cuda:0", 4, "sequential-offload"),
        ("cpu", 24, "resident"),
        ("cpu", 12, "sliced"),  # no offload on CPU: the lightest up-front plan is slicing
    ],
)
def test_the_plan_is_the_first_that_fits(device: str, free_gib: float, expected: str) -> None:
    plan, reason = choose_plan(device, SDXL_FP16, SDXL_UNET_FP16, WORKING, int(free_gib * GIB))
    assert plan.name == expected
    assert reason.startswith(expected) and f"{free_gib:.1f} GiB free" in reason


def test_working_memory_estimates_grow_with_pixels_images_and_precision() -> None:
    assert unet_working_bytes(1024, 1024, 1, 2) == 2 * GIB
    assert unet_working_bytes(2048, 1024, 2, 4) == 4 * unet_working_bytes(1024, 1024, 1, 2) * 2
    assert decode_bytes(1024, 1024, 1, 4) == 640 * 4 * 1024 * 1024


async def test_little_free_memory_starts_the_engine_sliced(monkeypatch: pytest.MonkeyPatch) -> None:
    import sdxl_refinery.engine.memory as memory_module

    monkeypatch.setattr(memory_module, "free_bytes", lambda device: 0)
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    result = await service.generate(REQUEST)
    engine = service._engine
    assert engine is not None and engine.memory_plan == "sliced"
    assert result.memory_plan == "sliced" and result.recoveries == []
    assert all(isinstance(p, SlicedAttnProcessor) for p in engine.pair.base.unet.attn_processors.values())
    service.close()


async def test_the_vae_decodes_in_tiles_only_when_a_decode_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    roomy = await service.generate(REQUEST)
    assert roomy.memory_plan == "resident"

    engine = service._engine
    assert engine is not None
    vae = engine.pair.base.vae
    tiling_at_decode: list[bool] = []
    original_decode = vae.decode

    def spy(*args: Any, **kwargs: Any) -> Any:
        tiling_at_decode.append(vae.use_tiling)
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", spy)
    monkeypatch.setattr(decode_module, "free_bytes", lambda device: 1024)
    cramped = await service.generate(REQUEST)
    assert cramped.memory_plan == "resident+tiled-vae"
    assert tiling_at_decode == [True] and not vae.use_tiling  # tiles for that decode only
    # the tiny VAE's tiles cover the whole 256px image, so the pixels are the plain decode's
    assert np.abs(np.asarray(cramped.images[0], dtype=int) - np.asarray(roomy.images[0], dtype=int)).max() <= 1
    service.close()


def test_free_bytes_reads_available_ram_on_cpu() -> None:
    import psutil

    free = memory.free_bytes("cpu")
    assert 0 < free <= psutil.virtual_memory().total
