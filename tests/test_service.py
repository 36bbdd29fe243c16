"""ImageService: the documented call, step counts, seeds, cancellation, fallback, concurrency."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_refinery import Cancelled, CancelToken, GenerationRequest, ImageService, InvalidRequest, Progress
from sdxl_refinery.png import read_metadata

from .conftest import SMALL


async def test_default_recipe_executes_50_base_and_30_refiner_steps(service: ImageService) -> None:
    seen: list[Progress] = []
    result = await service.generate(GenerationRequest(prompt="a red fox", seed=7, **SMALL), on_progress=seen.append)
    base = [p for p in seen if p.stage == 1]
    refiner = [p for p in seen if p.stage == 2]
    assert [p.step for p in base] == list(range(1, 51))
    assert [p.step for p in refiner] == list(range(1, 31))
    assert {p.total for p in base} == {50} and {p.total for p in refiner} == {30}
    assert (result.base_steps, result.refiner_steps, result.refined) == (50, 30, True)
    assert seen[-1].eta == 0.0 and all(p.eta >= 0 for p in seen)


@pytest.mark.parametrize(("steps", "refiner_steps", "strength"), [(20, 7, 0.3), (10, 13, 0.7), (5, 9, 1.0)])
async def test_sequential_refiner_executes_exactly_the_requested_steps(
    service: ImageService, steps: int, refiner_steps: int, strength: float
) -> None:
    request = GenerationRequest(
        prompt="x", num_inference_steps=steps, refiner_steps=refiner_steps, refiner_strength=strength, seed=1, **SMALL
    )
    stages: list[int] = []
    result = await service.generate(request, on_progress=lambda p: stages.append(p.stage))
    assert (stages.count(1), stages.count(2)) == (steps, refiner_steps)
    assert (result.base_steps, result.refiner_steps) == (steps, refiner_steps)


async def test_handoff_splits_the_same_total_steps(service: ImageService) -> None:
    request = GenerationRequest(prompt="x", num_inference_steps=20, mode="handoff", switch_at=0.8, seed=1, **SMALL)
    result = await service.generate(request)
    assert result.base_steps + result.refiner_steps == 20
    assert result.base_steps == 16


def test_handoff_switch_point_leaving_a_stage_no_step_is_refused_before_work() -> None:
    with pytest.raises(InvalidRequest) as caught:
        GenerationRequest(prompt="x", num_inference_steps=2, mode="handoff", switch_at=0.3, **SMALL)
    assert caught.value.field == "switch_at" and "leaves the base no step" in caught.value.rule
    with pytest.raises(InvalidRequest, match="leaves the refiner no step"):
        GenerationRequest(prompt="x", num_inference_steps=3, mode="handoff", switch_at=0.9995, **SMALL)


async def test_batch_has_distinct_consecutive_seeds_and_images(service: ImageService) -> None:
    request = GenerationRequest(prompt="x", num_inference_steps=4, refiner_steps=2, seed=100, n=3, **SMALL)
    result = await service.generate(request)
    assert result.seeds == [100, 101, 102]
    arrays = [np.asarray(image) for image in result.images]
    assert len(arrays) == 3
    assert not np.array_equal(arrays[0], arrays[1]) and not np.array_equal(arrays[1], arrays[2])


async def test_batched_image_equals_the_same_seed_alone(service: ImageService) -> None:
    alone = await service.generate(
        GenerationRequest(prompt="x", num_inference_steps=4, refiner_steps=2, seed=101, **SMALL)
    )
    batch = await service.generate(
        GenerationRequest(prompt="x", num_inference_steps=4, refiner_steps=2, seed=100, n=2, **SMALL)
    )
    difference = np.abs(np.asarray(alone.images[0], dtype=int) - np.asarray(batch.images[1], dtype=int))
    assert difference.max() <= 1


async def test_same_seed_gives_identical_pixels(service: ImageService) -> None:
    request = GenerationRequest(prompt="a castle", num_inference_steps=6, refiner_steps=3, seed=42, **SMALL)
    first = await service.generate(request)
    second = await service.generate(request)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


async def test_random_seed_is_reported(service: ImageService) -> None:
    result = await service.generate(GenerationRequest(prompt="x", num_inference_steps=2, refiner_steps=1, **SMALL))
    assert len(result.seeds) == 1 and 0 <= result.seeds[0] < 2**32


async def test_cancel_stops_within_one_step_and_writes_nothing(service: ImageService, tmp_path: Path) -> None:
    token = CancelToken()
    steps: list[Progress] = []

    def cancel_at_step_5(progress: Progress) -> None:
        steps.append(progress)
        if progress.stage == 1 and progress.step == 5:
            token.cancel()

    with pytest.raises(Cancelled):
        await service.generate(
            GenerationRequest(prompt="x", seed=1, **SMALL),
            output_path=tmp_path / "a.png",
            on_progress=cancel_at_step_5,
            cancel=token,
        )
    assert len(steps) == 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("stage", "step", "executed"), [(1, 5, (5, 0)), (2, 3, (50, 3))])
async def test_interrupt_keeps_the_image_as_it_stands(
    service: ImageService, tmp_path: Path, stage: int, step: int, executed: tuple[int, int]
) -> None:
    token = CancelToken()
    seen: list[Progress] = []

    def interrupt_there(progress: Progress) -> None:
        seen.append(progress)
        if (progress.stage, progress.step) == (stage, step):
            token.interrupt()

    result = await service.generate(
        GenerationRequest(prompt="x", seed=1, **SMALL),
        output_path=tmp_path / "a.png",
        on_progress=interrupt_there,
        cancel=token,
    )
    assert len(seen) == sum(executed)  # stopped within one step, the refiner skipped if not reached
    assert (result.interrupted, result.refined, (result.base_steps, result.refiner_steps)) == (True, False, executed)
    assert result.images[0].size == (256, 256) and np.asarray(result.images[0]).std() > 0
    assert read_metadata(tmp_path / "a.png")["interrupted"] is True


async def test_cancelling_the_awaiting_task_stops_the_run(service: ImageService) -> None:
    steps: list[Progress] = []
    task = asyncio.create_task(
        service.generate(GenerationRequest(prompt="x", num_inference_steps=500, **SMALL), on_progress=steps.append)
    )
    while len(steps) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The engine thread is free again soon: the next call runs.
    result = await service.generate(GenerationRequest(prompt="x", num_inference_steps=2, refiner_steps=1, **SMALL))
    assert result.refined
    assert len(steps) < 500


async def test_refiner_failure_keeps_the_base_image_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")  # its memory plan will change
    await service.load()
    refiner_unet = service._engine.pair.refiner.unet  # type: ignore[union-attr]

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(refiner_unet, "forward", out_of_memory)
    for mode in ("sequential", "handoff"):
        with caplog.at_level(logging.WARNING):
            result = await service.generate(
                GenerationRequest(prompt="x", num_inference_steps=10, mode=mode, seed=3, **SMALL)
            )
        assert result.refined is False
        assert result.refiner_steps == 0
        assert "out of memory" in (result.refinement_error or "")
        assert len(result.images) == 1 and np.asarray(result.images[0]).std() > 1.0
        assert "Stage 2 failed" in caplog.text
    # Lighter memory plans were tried first; the base image is kept only under the last one.
    assert result.memory_plan == "tiled"
    service.close()


async def test_use_refinement_false_skips_stage_two(service: ImageService, caplog: pytest.LogCaptureFixture) -> None:
    stages: set[int] = set()
    with caplog.at_level(logging.INFO):
        result = await service.generate(
            GenerationRequest(prompt="x", num_inference_steps=3, use_refinement=False, **SMALL),
            on_progress=lambda p: stages.add(p.stage),
        )
    assert stages == {1}
    assert (result.refined, result.refiner_steps, result.base_steps) == (False, 0, 3)
    assert "Refinement: DISABLED" in caplog.text


async def test_two_concurrent_calls_run_one_after_the_other_and_the_loop_stays_responsive(
    service: ImageService,
) -> None:
    spans: list[tuple[str, int, float]] = []
    request = GenerationRequest(prompt="x", num_inference_steps=30, refiner_steps=10, seed=5, **SMALL)

    def recorder(name: str):  # type: ignore[no-untyped-def]
        return lambda p: spans.append((name, p.stage, time.perf_counter()))

    ticks = 0

    async def heartbeat() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(heartbeat())
    await asyncio.gather(
        service.generate(request, on_progress=recorder("a")), service.generate(request, on_progress=recorder("b"))
    )
    beat.cancel()
    names = [name for name, _, _ in spans]
    first_b = names.index("b")
    assert all(name == "a" for name in names[:first_b]) and all(name == "b" for name in names[first_b:])
    assert names.count("a") == names.count("b") == 40
    assert ticks > 10  # the event loop kept running while both generated


async def test_generate_image_documented_call_writes_png_and_logs_stages(
    service: ImageService, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    output = tmp_path / "out" / "landscape.png"
    with caplog.at_level(logging.INFO):
        ok = await service.generate_image(
            prompt="A beautiful landscape with mountains",
            output_path=str(output),
            num_inference_steps=50,
            high_quality=True,
            **SMALL,
        )
    assert ok is True
    metadata = read_metadata(output)
    assert metadata["request"]["guidance_scale"] == 8.0
    assert (metadata["base_steps"], metadata["refiner_steps"], metadata["refined"]) == (50, 30, True)
    for line in (
        "Mode: HIGH QUALITY (base steps=50, guidance=8.0)",
        "Refinement: ENABLED",
        "Device: CPU",
        "CPU refinement will take longer",
        "Stage 1/2: Base generation (50 steps)",
        "Stage 1 complete",
        "Stage 2/2: Refinement pass (30 additional steps)",
        "Stage 2 complete",
        f"Image saved to {output}",
    ):
        assert line in caplog.text


async def test_generate_image_guidance_follows_high_quality_unless_given(service: ImageService, tmp_path: Path) -> None:
    assert await service.generate_image(
        "x", tmp_path / "a.png", num_inference_steps=2, high_quality=False, refiner_steps=1, **SMALL
    )
    assert read_metadata(tmp_path / "a.png")["request"]["guidance_scale"] == 7.5
    assert await service.generate_image(
        "x", tmp_path / "b.png", num_inference_steps=2, guidance_scale=3.0, refiner_steps=1, **SMALL
    )
    assert read_metadata(tmp_path / "b.png")["request"]["guidance_scale"] == 3.0


async def test_batch_writes_numbered_files(service: ImageService, tmp_path: Path) -> None:
    result = await service.generate(
        GenerationRequest(prompt="x", num_inference_steps=2, refiner_steps=1, n=2, seed=9, **SMALL),
        output_path=tmp_path / "cat.png",
    )
    assert result.paths == [str(tmp_path / "cat-1.png"), str(tmp_path / "cat-2.png")]
    assert [read_metadata(Path(p))["index"] for p in result.paths] == [0, 1]


async def test_result_records_device_precision_and_timings(service: ImageService) -> None:
    result = await service.generate(GenerationRequest(prompt="x", num_inference_steps=2, refiner_steps=1, **SMALL))
    assert (result.device, result.precision) == ("cpu", "fp32")
    assert set(result.timings) >= {"base", "refiner", "decode", "total"}
    assert result.models["base_source"].startswith("folder:")


def test_models_come_from_arguments_then_environment_then_sdxl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REFINERY_BASE_MODEL", raising=False)
    monkeypatch.delenv("REFINERY_REFINER_MODEL", raising=False)
    default = ImageService()
    assert (default.base_model, default.refiner_model) == (
        "stabilityai/stable-diffusion-xl-base-1.0",
        "stabilityai/stable-diffusion-xl-refiner-1.0",
    )
    monkeypatch.setenv("REFINERY_BASE_MODEL", "tiny")
    monkeypatch.setenv("REFINERY_REFINER_MODEL", "tiny")
    assert (ImageService().base_model, ImageService().refiner_model) == ("tiny", "tiny")
    assert ImageService("my/base", "my/refiner").base_model == "my/base"
    for service in (default,):
        service.close()


async def test_clip_skip_changes_the_image_and_a_deeper_one_than_the_encoders_is_refused(
    service: ImageService, tmp_path: Path
) -> None:
    plain = GenerationRequest(prompt="a lighthouse", num_inference_steps=3, refiner_steps=2, seed=3, **SMALL)
    skipped = plain.model_copy(update={"clip_skip": 2})
    first = await service.generate(plain)
    second = await service.generate(skipped, output_path=tmp_path / "skip.png")
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert "Clip skip: 2" in Image.open(tmp_path / "skip.png").text["parameters"]
    with pytest.raises(InvalidRequest) as caught:
        await service.generate(plain.model_copy(update={"clip_skip": 4}))  # the tiny encoders have 3 layers
    assert caught.value.field == "clip_skip" and "at most 3" in caught.value.rule
