"""Numerical and memory faults: retried in fp32 or under lighter memory plans, never a NaN image as success."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_refinery import GenerationFailed, GenerationRequest, ImageService

REQUEST = GenerationRequest(prompt="a kite", width=256, height=256, num_inference_steps=6, refiner_steps=3, seed=8)


@pytest.fixture
def bf16_service() -> Iterator[ImageService]:
    service = ImageService("tiny", "tiny", device="cpu", precision="bf16")
    yield service
    service.close()


def _engine(service: ImageService) -> Any:
    return service._engine


def _poison(module: Any, monkeypatch: pytest.MonkeyPatch, when: str = "bf16") -> None:
    """Make `module` return NaN, in bf16 only (an overflow fp32 fixes) or always."""
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if when == "always" or module.dtype == torch.bfloat16:
            first = output[0] if isinstance(output, tuple) else output.sample
            return (torch.full_like(first, float("nan")),)
        return output

    monkeypatch.setattr(module, "forward", forward)


def _healthy(result: Any) -> bool:
    pixels = np.asarray(result.images[0], dtype=float)
    return bool(np.isfinite(pixels).all() and pixels.std() > 1.0)


async def test_nan_in_the_base_stage_is_rerun_in_fp32(
    bf16_service: ImageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bf16_service.load()
    unet = _engine(bf16_service).pair.base.unet
    _poison(unet, monkeypatch)
    result = await bf16_service.generate(REQUEST)
    assert _healthy(result) and result.refined
    assert result.recoveries == ["NaN/Inf in the base stage's latents; stages rerun in fp32"]
    assert unet.dtype == torch.bfloat16  # back to the policy's precision for the next job


async def test_nan_in_the_refiner_is_rerun_in_fp32(bf16_service: ImageService, monkeypatch: pytest.MonkeyPatch) -> None:
    await bf16_service.load()
    _poison(_engine(bf16_service).pair.refiner.unet, monkeypatch)
    result = await bf16_service.generate(REQUEST)
    assert _healthy(result) and result.refined and result.refiner_steps == 3
    assert result.recoveries == ["NaN/Inf in the refiner stage's latents; stages rerun in fp32"]


async def test_nan_in_the_vae_decode_is_decoded_again_in_fp32(
    bf16_service: ImageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    await bf16_service.load()
    decoder = _engine(bf16_service).pair.base.vae.decoder
    original = decoder.forward

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        output: torch.Tensor = original(*args, **kwargs)
        return torch.full_like(output, float("nan")) if output.dtype == torch.bfloat16 else output

    monkeypatch.setattr(decoder, "forward", forward)
    result = await bf16_service.generate(REQUEST)
    assert _healthy(result)
    assert result.recoveries == ["NaN/Inf in the VAE decode; decoded again in fp32"]


async def test_nan_that_fp32_cannot_fix_fails_the_job_and_writes_nothing(
    bf16_service: ImageService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await bf16_service.load()
    _poison(_engine(bf16_service).pair.base.unet, monkeypatch, when="always")
    with pytest.raises(GenerationFailed, match="numerical fault: NaN/Inf in the base stage's latents, even with every"):
        await bf16_service.generate(REQUEST, output_path=tmp_path / "x.png")
    assert await bf16_service.generate_image("a kite", tmp_path / "y.png", width=256, height=256) is False
    assert list(tmp_path.iterdir()) == []


async def test_nan_in_fp32_fails_at_once() -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    await service.load()
    unet = _engine(service).pair.base.unet
    with pytest.MonkeyPatch.context() as patch:
        _poison(unet, patch, when="always")
        with pytest.raises(GenerationFailed, match="with every model already in fp32"):
            await service.generate(REQUEST)
    service.close()


def _out_of_memory_for(module: Any, monkeypatch: pytest.MonkeyPatch, times: int | None) -> list[int]:
    calls = [0]
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if times is None or calls[0] <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return calls


async def test_out_of_memory_retries_under_a_lighter_plan_and_stays_there(monkeypatch: pytest.MonkeyPatch) -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    await service.load()
    _out_of_memory_for(_engine(service).pair.base.unet, monkeypatch, times=1)
    result = await service.generate(REQUEST)
    assert _healthy(result) and result.refined and result.memory_plan == "sliced"
    assert result.recoveries == ["out of memory under plan resident; retried under sliced"]
    again = await service.generate(REQUEST)
    assert again.memory_plan == "sliced" and again.recoveries == []
    # Slicing computes the same attention in pieces: the image matches the unsliced one closely.
    difference = np.abs(np.asarray(result.images[0], dtype=int) - np.asarray(again.images[0], dtype=int))
    assert difference.max() <= 1
    service.close()


async def test_out_of_memory_under_every_plan_fails_clearly_and_the_next_job_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    await service.load()
    with pytest.MonkeyPatch.context() as patch:
        _out_of_memory_for(_engine(service).pair.base.unet, patch, times=None)
        with pytest.raises(GenerationFailed, match="out of memory under every memory plan \\(last: tiled\\)"):
            await service.generate(REQUEST)
    result = await service.generate(REQUEST)  # the same service (a worker's) keeps working
    assert _healthy(result) and result.memory_plan == "tiled"
    service.close()
