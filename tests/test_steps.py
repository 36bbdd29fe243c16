"""The one step plan: what validation, the engine, the worker and clients count is what diffusers runs."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from diffusers import EulerDiscreteScheduler

from sdxl_refinery import ImageService
from sdxl_refinery.engine.single_file import shipped_config
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.jobs.models import Job
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore
from sdxl_refinery.jobs.storage import FolderStorage
from sdxl_refinery.jobs.worker import Worker, _JobReporter
from sdxl_refinery.request import CancelToken, GenerationRequest, Mode
from sdxl_refinery.steps import Schedule, plan_steps

SWITCH_POINTS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95


def _sdxl_scheduler(spacing: str | None = None) -> EulerDiscreteScheduler:
    config = shipped_config("sdxl-base")["scheduler"]
    if spacing:
        config = {**config, "timestep_spacing": spacing}
    return EulerDiscreteScheduler.from_config(config)


def _diffusers_base_steps(scheduler: EulerDiscreteScheduler, steps: int, switch_at: float) -> int:
    """What StableDiffusionXLPipeline executes with `denoising_end=switch_at` (its own rule, restated)."""
    scheduler.set_timesteps(steps)
    total = scheduler.config.num_train_timesteps
    cutoff = round(total - (switch_at * total))
    return len([t for t in scheduler.timesteps if t >= cutoff])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_schedule_timesteps_equal_diffusers(spacing: str) -> None:
    scheduler = _sdxl_scheduler(spacing)
    schedule = Schedule.from_config(scheduler.config)
    for steps in range(1, 61):
        scheduler.set_timesteps(steps)
        ours = schedule.timesteps(steps)
        assert ours == pytest.approx([float(t) for t in scheduler.timesteps], abs=1e-3), (spacing, steps)


def test_sweep_plan_equals_diffusers_and_the_worker_totals(tmp_path: Path) -> None:
    """steps 1..60 x switch_at 0.05..0.95: validation, the plan, the worker's totals and diffusers agree."""
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")  # the reporter's store: not written until a step reports
    scheduler = _sdxl_scheduler()
    assert Schedule.from_config(scheduler.config) == Schedule()  # SDXL's shipped scheduler is the default plan's
    checked = 0
    for steps in range(1, 61):
        for switch_at in SWITCH_POINTS:
            expected_base = _diffusers_base_steps(scheduler, steps, switch_at)
            fields = {"prompt": "x", "num_inference_steps": steps, "mode": "handoff", "switch_at": switch_at}
            if expected_base in (0, steps):
                with pytest.raises(InvalidRequest, match="switch_at"):
                    GenerationRequest(**fields)
                continue
            request = GenerationRequest(**fields)
            plan = plan_steps(request)
            assert (plan.base_steps, plan.refiner_steps) == (expected_base, steps - expected_base), (steps, switch_at)
            reporter = _JobReporter(Job(Job.new_id(), request), store, _Events(), None, CancelToken(), False, print)
            assert reporter.totals == {1: expected_base, 2: steps - expected_base}  # what the worker counts to
            checked += 1
    assert checked > 900
    store.close()
    # The case that disagreed before the plan was one function: 7 steps at 0.8 run 5 base steps, not 6.
    assert plan_steps(GenerationRequest(prompt="x", num_inference_steps=7, mode="handoff")).base_steps == 5


def test_sequential_plan_runs_exactly_the_refiner_steps() -> None:
    for refiner_steps, strength in ((30, 0.3), (7, 0.3), (13, 0.7), (9, 1.0), (1, 0.01)):
        plan = plan_steps(GenerationRequest(prompt="x", refiner_steps=refiner_steps, refiner_strength=strength))
        assert plan.refiner_steps == refiner_steps
        assert plan.refiner_strength is not None
        assert int(plan.refiner_schedule * plan.refiner_strength) == refiner_steps
    plan = plan_steps(GenerationRequest(prompt="x", use_refinement=False))
    assert plan.totals == {1: 50, 2: 0}


class _Events:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        self.sent.append((event, data))

    def set_preview(self, job_id: str, png: bytes) -> None: ...

    def drop_preview(self, job_id: str) -> None: ...


@pytest.mark.parametrize(("steps", "switch_at", "mode"), [(7, 0.8, Mode.HANDOFF), (9, 0.35, Mode.HANDOFF),
                                                          (5, 0.8, Mode.SEQUENTIAL)])  # fmt: skip
def test_progress_a_client_sees_equals_the_steps_the_result_reports(
    service: ImageService, tmp_path: Path, steps: int, switch_at: float, mode: Mode
) -> None:
    request = GenerationRequest(prompt="a kite", num_inference_steps=steps, refiner_steps=3, mode=mode,
                                switch_at=switch_at, width=256, height=256, seed=1)  # fmt: skip
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    events = _Events()
    worker = Worker(store, service, FolderStorage(tmp_path / "images"), events, preview_every=0)
    job = store.create(request, "test")
    asyncio.run(worker.process(store.claim_next("w") or job))
    done = store.get(job.id)
    metadata = done.result["metadata"]  # type: ignore[index]
    progress = [data for event, data in events.sent if event == "progress"]
    totals = {data["stage"]: data["total"] for data in progress}
    last = {data["stage"]: data["step"] for data in progress}
    assert totals == {1: metadata["base_steps"], 2: metadata["refiner_steps"]} == last
    percents = [data["percent"] for data in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0  # a progress bar never goes back
    for stage, total in totals.items():  # every step of each stage, once, in order
        assert [data["step"] for data in progress if data["stage"] == stage] == list(range(1, total + 1))
    assert json.loads(json.dumps(progress)) == progress  # SSE sends it as JSON: nothing lost on the way
    store.close()
