"""Batching in the service and engine: requests sharing a pass come out as they do alone, each its own."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_refinery import (
    Cancelled,
    CancelToken,
    GenerationFailed,
    GenerationRequest,
    ImageService,
    InvalidRequest,
    Progress,
    StorageError,
)
from sdxl_refinery.batching import BatchCall, batch_key, default_batching
from sdxl_refinery.png import read_metadata

# A batch against the same images made one by one: the UNet's matrix products round differently for a larger
# batch (diffusers' own batch-against-single tests allow 1e-4 of the [0, 1] range per step), and 14 steps of
# that may move a pixel by a level. Anything else (another seed, another prompt) moves it by tens of levels.
BATCH_TOLERANCE = 2  # levels of 255
QUICK = {"width": 128, "height": 128, "num_inference_steps": 8, "refiner_steps": 6}


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _assert_same(batched: list[Image.Image], alone: list[Image.Image]) -> None:
    assert len(batched) == len(alone)
    for mine, theirs in zip(batched, alone, strict=True):
        assert np.abs(_pixels(mine) - _pixels(theirs)).max() <= BATCH_TOLERANCE


def test_batch_key_ignores_words_and_seeds_and_nothing_else() -> None:
    one = GenerationRequest(prompt="a fox", negative_prompt="blur", seed=1, n=1, **QUICK)
    other = GenerationRequest(prompt="a castle at dusk", seed=99, n=3, **QUICK)
    assert batch_key(one) == batch_key(other)
    changes = [{"guidance_scale": 5.0}, {"width": 256}, {"sampler": "DPM++ 2M"}, {"refiner_strength": 0.4},
               {"mode": "handoff"}, {"clip_skip": 2}, {"use_refinement": False}, {"base_model": "other"}]  # fmt: skip
    for change in changes:
        assert batch_key(GenerationRequest(prompt="a fox", **{**QUICK, **change})) != batch_key(one), change
    tagged = GenerationRequest(prompt="a fox <lora:ink:0.5>", **QUICK)
    listed = GenerationRequest(prompt="a fox", loras=[{"name": "ink", "weight": 0.5}], **QUICK)
    assert batch_key(tagged) == batch_key(listed) != batch_key(one)  # LoRAs compare as applied
    red = Image.new("RGB", (128, 128), "red")
    assert batch_key(GenerationRequest(prompt="a fox", init_image=red, strength=0.5, **QUICK)) is None


def test_only_cuda_batches_by_default() -> None:
    assert default_batching("cpu") == (1, 0)
    size, window = default_batching("cuda:1")
    assert size > 1 and 0 < window <= 1000


async def test_each_request_of_a_batch_gets_the_images_it_gets_alone(service: ImageService, tmp_path: Path) -> None:
    requests = [
        GenerationRequest(prompt="a red fox in snow", seed=11, **QUICK),
        GenerationRequest(prompt="a lighthouse", negative_prompt="fog", seed=200, n=2, **QUICK),
        GenerationRequest(prompt="a bowl of cherries", seed=7, **QUICK),
    ]
    seen: list[list[Progress]] = [[], [], []]
    calls = [BatchCall(request, tmp_path / f"job{index}.png", seen[index].append)
             for index, request in enumerate(requests)]  # fmt: skip
    batched = await service.generate_batch(calls)
    alone = [await service.generate(request, output_path=tmp_path / f"alone{index}.png")
             for index, request in enumerate(requests)]  # fmt: skip
    for index, (mine, theirs) in enumerate(zip(batched, alone, strict=True)):
        assert not isinstance(mine, Exception)
        _assert_same(mine.images, theirs.images)
        assert (mine.seeds, mine.base_steps, mine.refiner_steps, mine.refined) == (theirs.seeds, 8, 6, True)
        # Each job reports its own steps, in order, and its PNG records its own request as alone.
        assert [(p.stage, p.step) for p in seen[index]] == [(1, s) for s in range(1, 9)] + [(2, s) for s in range(1, 7)]
        recorded, own = read_metadata(Path(mine.paths[0])), read_metadata(Path(theirs.paths[0]))
        assert (recorded["request"], recorded["seeds"], recorded["parameters"]) == (
            own["request"], own["seeds"], own["parameters"])  # fmt: skip
    # The jobs are not the same images: the test would notice a mix-up.
    assert np.abs(_pixels(alone[0].images[0]) - _pixels(alone[2].images[0])).max() > 20


async def test_prompts_of_different_lengths_share_no_pass_and_still_match(service: ImageService) -> None:
    long_prompt = ", ".join(["a very detailed painting of a harbour at dawn"] * 12)  # over 75 tokens
    requests = [GenerationRequest(prompt="a fox", seed=3, **QUICK),
                GenerationRequest(prompt=long_prompt, seed=4, **QUICK)]  # fmt: skip
    batched = await service.generate_batch([BatchCall(request) for request in requests])
    for mine, request in zip(batched, requests, strict=True):
        assert not isinstance(mine, Exception)
        _assert_same(mine.images, (await service.generate(request)).images)


async def test_cancelling_one_request_of_three_leaves_the_others_their_images(service: ImageService) -> None:
    requests = [GenerationRequest(prompt=f"picture {index}", seed=index, **QUICK) for index in range(3)]
    tokens = [CancelToken() for _ in requests]

    def cancel_middle_at_step_3(progress: Progress) -> None:
        if progress.stage == 1 and progress.step == 3:
            tokens[1].cancel()

    steps_after_cancel: list[Progress] = []
    calls = [BatchCall(requests[0], cancel=tokens[0], on_progress=cancel_middle_at_step_3),
             BatchCall(requests[1], cancel=tokens[1], on_progress=steps_after_cancel.append),
             BatchCall(requests[2], cancel=tokens[2])]  # fmt: skip
    outcomes = await service.generate_batch(calls)
    assert isinstance(outcomes[1], Cancelled)
    assert max(p.step for p in steps_after_cancel if p.stage == 1) <= 3 and not any(
        p.stage == 2 for p in steps_after_cancel
    )  # its progress stops with it
    for index in (0, 2):
        result = outcomes[index]
        assert not isinstance(result, Exception) and result.refined
        _assert_same(result.images, (await service.generate(requests[index])).images)


async def test_interrupting_one_request_keeps_its_image_and_the_others_finish(service: ImageService) -> None:
    requests = [GenerationRequest(prompt=f"scene {index}", seed=40 + index, **QUICK) for index in range(2)]
    tokens = [CancelToken(), CancelToken()]

    def interrupt_first_at_step_4(progress: Progress) -> None:
        if progress.stage == 1 and progress.step == 4:
            tokens[0].interrupt()

    calls = [BatchCall(requests[0], cancel=tokens[0], on_progress=interrupt_first_at_step_4),
             BatchCall(requests[1], cancel=tokens[1])]  # fmt: skip
    kept, finished = await service.generate_batch(calls)
    assert not isinstance(kept, Exception) and not isinstance(finished, Exception)
    assert (kept.interrupted, kept.refined, kept.base_steps, kept.refiner_steps) == (True, False, 4, 0)
    assert (finished.interrupted, finished.refined, finished.base_steps, finished.refiner_steps) == (False, True, 8, 6)
    # The kept image is what the same request interrupted alone at that step gives.
    token = CancelToken()

    def interrupt_at_4(progress: Progress) -> None:
        if progress.stage == 1 and progress.step == 4:
            token.interrupt()

    alone = await service.generate(requests[0], cancel=token, on_progress=interrupt_at_4)
    _assert_same(kept.images, alone.images)
    _assert_same(finished.images, (await service.generate(requests[1])).images)


async def test_a_request_failing_in_a_batch_fails_alone(service: ImageService, tmp_path: Path) -> None:
    (tmp_path / "blocked").write_text("a file where a folder should be")
    requests = [GenerationRequest(prompt=f"thing {index}", seed=index, **QUICK) for index in range(2)]
    calls = [BatchCall(requests[0], tmp_path / "blocked" / "x.png"), BatchCall(requests[1], tmp_path / "ok.png")]
    failed, result = await service.generate_batch(calls)
    assert isinstance(failed, StorageError) and "not writable" in str(failed)
    assert not isinstance(result, Exception) and Path(result.paths[0]).is_file()


async def test_numerical_fault_of_one_request_fails_it_alone(
    service: ImageService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass holding the faulty request gives NaN (as a sample that overflows in fp16 would); the batch is run
    again request by request, the faulty one fails after its own fp32 retry, the others are untouched."""
    from sdxl_refinery.engine import run as engine_run

    original = engine_run.TwoStageRunner._run_once

    def nan_with_poison(self: object, run: engine_run.Pass, last_plan: bool, fp32: bool) -> list[object]:
        if any(item.request.prompt == "poison" for item in run.items):
            raise engine_run.NonFinite("NaN/Inf in the base stage's latents")
        return original(self, run, last_plan, fp32)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_run.TwoStageRunner, "_run_once", nan_with_poison)
    requests = [GenerationRequest(prompt=text, seed=5, **QUICK) for text in ("a tree", "poison", "a river")]
    first, faulty, last = await service.generate_batch([BatchCall(request) for request in requests])
    assert isinstance(faulty, GenerationFailed) and "numerical fault" in str(faulty)
    assert not isinstance(first, Exception) and not isinstance(last, Exception)
    assert first.recoveries == [] and last.recoveries == []  # nobody else paid for the fp32 retry
    monkeypatch.undo()
    _assert_same(first.images, (await service.generate(requests[0])).images)


async def test_requests_that_cannot_share_a_pass_are_refused_naming_the_field(service: ImageService) -> None:
    calls = [BatchCall(GenerationRequest(prompt="a", **QUICK)),
             BatchCall(GenerationRequest(prompt="b", guidance_scale=3.0, **QUICK))]  # fmt: skip
    with pytest.raises(InvalidRequest) as caught:
        await service.generate_batch(calls)
    assert caught.value.field == "requests"


async def test_all_cancelled_before_the_start_renders_nothing(service: ImageService) -> None:
    tokens = [CancelToken(), CancelToken()]
    for token in tokens:
        token.cancel()
    started = threading.Event()
    calls = [BatchCall(GenerationRequest(prompt=f"p{index}", **QUICK), cancel=token,
                       on_progress=lambda _: started.set()) for index, token in enumerate(tokens)]  # fmt: skip
    outcomes = await service.generate_batch(calls)
    assert all(isinstance(outcome, Cancelled) for outcome in outcomes) and not started.is_set()
