"""Speed options: the policy per device, proof that each is active when selected, and unchanged images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0

from sdxl_refinery import GenerationRequest, ImageService, InvalidRequest
from sdxl_refinery.engine.device import Placement
from sdxl_refinery.engine.speed import CUDA_COMPILE_MODE, choose_speed_plan, is_compiled, usable_cpus
from sdxl_refinery.request import SpeedOptions

REQUEST = GenerationRequest(prompt="a red kite", width=256, height=256, num_inference_steps=4, refiner_steps=2, seed=5)
CPU = Placement("cpu", torch.bfloat16, torch.bfloat16, "test")
CUDA = Placement("cuda:0", torch.float16, torch.float32, "test")
# Tolerance against the plain fp32 run: reordered float sums (fused GEMMs, compiled kernels) move a
# pixel by a level or two at most; a wrong layout or projection would move it by tens.
MAX_PIXEL_DIFFERENCE = 2


def _cgroup(tmp_path: Path, cpu_max: str | None) -> Path:
    if cpu_max is not None:
        (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [(None, 4), ("max 100000", 4), ("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1)],
)
def test_threads_follow_the_affinity_mask_and_the_cgroup_quota(
    tmp_path: Path, cpu_max: str | None, expected: int
) -> None:
    assert usable_cpus(affinity={0, 1, 2, 3}, cgroup_root=_cgroup(tmp_path, cpu_max)) == expected


def test_cpu_policy_sets_threads_and_leaves_the_rest_off() -> None:
    plan = choose_speed_plan(CPU)
    assert plan.threads == usable_cpus()
    assert (plan.channels_last, plan.fused_qkv, plan.compile_mode) == (False, False, None)


def test_cuda_policy_turns_on_layout_and_fusion_and_compiles_only_on_request() -> None:
    # Measured on an H200: max-autotune's warm-up ran past 200 s per UNet and shape, against 5.3 s per
    # eager 1024 image, so `auto` runs eagerly and `on` compiles.
    plan = choose_speed_plan(CUDA)
    assert plan.threads is None
    assert (plan.channels_last, plan.fused_qkv, plan.compile_mode) == (True, True, None)
    assert plan.names() == ["channels-last", "fused-qkv"]
    asked = choose_speed_plan(CUDA, SpeedOptions(compile="on"))
    assert asked.compile_mode == CUDA_COMPILE_MODE
    assert asked.names() == ["channels-last", "fused-qkv", f"compiled({CUDA_COMPILE_MODE})"]


def test_cuda_does_not_compile_when_weights_move_between_devices(caplog: pytest.LogCaptureFixture) -> None:
    plan = choose_speed_plan(CUDA, SpeedOptions(compile="on"), offload=True)
    assert plan.compile_mode is None and plan.channels_last and plan.fused_qkv
    assert "not applied under CPU offload" in caplog.text


def test_explicit_choices_win_over_the_policy() -> None:
    plan = choose_speed_plan(CPU, SpeedOptions(compile="on", channels_last="on", fused_qkv="on", threads=1))
    assert (plan.threads, plan.channels_last, plan.fused_qkv, plan.compile_mode) == (1, True, True, "frozen")
    assert choose_speed_plan(CUDA, SpeedOptions(compile="off", fused_qkv="off")).compile_mode is None


@pytest.mark.parametrize(("field", "value"), [("compile", "yes"), ("channels_last", "1"), ("fused_qkv", "")])
def test_a_bad_toggle_is_refused_naming_the_field(field: str, value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        SpeedOptions(**{field: value})  # type: ignore[arg-type]
    assert caught.value.field == field and "auto, on, off" in caught.value.rule


def test_negative_threads_are_refused() -> None:
    with pytest.raises(InvalidRequest) as caught:
        SpeedOptions(threads=-1)
    assert caught.value.field == "threads"


# `optimizations` is read on the engine thread, where the models run: torch's thread count is per thread.
async def _render(speed: SpeedOptions) -> tuple[np.ndarray, list[str], ImageService]:
    service = ImageService("tiny", "tiny", device="cpu", precision="full", speed=speed)
    result = await service.generate(REQUEST)
    return np.asarray(result.images[0], dtype=np.int16), result.optimizations, service


@pytest.fixture(scope="module")
def plain_pixels() -> np.ndarray:
    import asyncio

    pixels, optimizations, service = asyncio.run(_render(SpeedOptions(threads=1)))
    service.close()
    assert optimizations == ["threads=1"]
    return pixels


async def test_channels_last_and_fused_qkv_are_active_and_keep_the_image(plain_pixels: np.ndarray) -> None:
    pixels, optimizations, service = await _render(SpeedOptions(channels_last="on", fused_qkv="on", threads=1))
    engine = service._engine
    assert engine is not None
    for unet in (engine.pair.base.unet, engine.pair.refiner.unet):
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    assert optimizations == ["threads=1", "channels-last", "fused-qkv"]
    assert np.abs(pixels - plain_pixels).max() <= MAX_PIXEL_DIFFERENCE
    service.close()


async def test_compiled_unets_are_active_and_keep_the_image(plain_pixels: np.ndarray) -> None:
    torch._dynamo.reset()
    pixels, optimizations, service = await _render(SpeedOptions(compile="on", threads=1))
    engine = service._engine
    assert engine is not None
    assert is_compiled(engine.pair.base.unet) and is_compiled(engine.pair.refiner.unet)
    assert "compiled" in optimizations
    # the compiled graphs really ran: dynamo counted frames it turned into graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2
    assert np.abs(pixels - plain_pixels).max() <= MAX_PIXEL_DIFFERENCE
    service.close()


async def test_a_nan_under_compiled_unets_is_rerun_in_fp32_with_the_plain_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Frozen graphs hold bf16 weights, so the fp32 retry runs the plain UNets and the compiled ones come back."""
    torch._dynamo.reset()
    service = ImageService("tiny", "tiny", device="cpu", precision="bf16", speed=SpeedOptions(compile="on"))
    await service.load()
    engine = service._engine
    assert engine is not None
    compiled_base = engine.pair.base.unet
    plain_base = compiled_base._orig_mod
    original = plain_base.forward

    def forward(*args: object, **kwargs: object) -> object:  # an overflow that only bf16 suffers
        output = original(*args, **kwargs)
        return (torch.full_like(output[0], float("nan")),) if plain_base.dtype == torch.bfloat16 else output

    monkeypatch.setattr(plain_base, "forward", forward)
    result = await service.generate(REQUEST)
    assert result.refined and result.recoveries == ["NaN/Inf in the base stage's latents; stages rerun in fp32"]
    assert np.asarray(result.images[0], dtype=float).std() > 1.0
    assert engine.pair.base.unet is compiled_base and plain_base.dtype == torch.bfloat16
    service.close()
