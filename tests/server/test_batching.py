"""Batching on a real server: compatible jobs share a pass, each stays its own, and the queue stays fair."""

from __future__ import annotations

from typing import Any

from ..fakes import FakeEngine
from ..waiting import poll
from .conftest import RunningServer, ServerFactory

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4, "refiner_steps": 2}


def _submit(server: RunningServer, **fields: Any) -> str:
    answer = server.client.post("/v1/jobs", json={**SMALL, **fields})
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def _block(server: RunningServer, engine: FakeEngine) -> str:
    """A job of its own kind held at its first step, so that the next jobs wait in the queue together."""
    engine.pause_at(1)
    blocker = _submit(server, prompt="blocker", width=128)
    poll(engine.paused.is_set, "the blocker to hold")
    return blocker


def test_compatible_jobs_share_one_pass_and_each_gets_its_own_images(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(max_batch=8, batch_window_ms=0) as server:
        blocker = _block(server, fake_engine)
        jobs = [_submit(server, prompt=f"job {index}", seed=100 + index, n=1 + index % 2) for index in range(3)]
        fake_engine.resume()
        done = [server.wait_for(job_id, {"succeeded"}) for job_id in [blocker, *jobs]]
    assert [[request.prompt for request in batch] for batch in fake_engine.batches] == [
        ["blocker"], ["job 0", "job 1", "job 2"]]  # fmt: skip
    for index, job in enumerate(done[1:]):
        assert job["result"]["seeds"] == [100 + index + k for k in range(1 + index % 2)]
        assert len(job["result"]["images"]) == 1 + index % 2
        assert job["result"]["metadata"]["request"]["prompt"] == f"job {index}"
        assert job["batch"] == {"jobs": 3, "images": 4}


def test_an_incompatible_job_at_the_head_runs_right_after_the_batch_behind_it(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    """Queue: A, X (another size), B, C. A takes B and C along; X is next, before anything queued later."""
    with server_factory(max_batch=8, batch_window_ms=0) as server:
        blocker = _block(server, fake_engine)
        a = _submit(server, prompt="A")
        x = _submit(server, prompt="X", width=128, height=128)
        b, c = _submit(server, prompt="B"), _submit(server, prompt="C")
        fake_engine.resume(then_pause_at=1)  # hold the A batch, then queue more A-like jobs behind X
        poll(lambda: len(fake_engine.batches) == 2 and fake_engine.paused.is_set(), "the A batch to hold", limit=30)
        later = [_submit(server, prompt=f"late {index}") for index in range(3)]
        fake_engine.resume()
        for job_id in [blocker, a, x, b, c, *later]:
            server.wait_for(job_id, {"succeeded"})
    prompts = [[request.prompt for request in batch] for batch in fake_engine.batches]
    assert prompts == [["blocker"], ["A", "B", "C"], ["X"], ["late 0", "late 1", "late 2"]]


def test_a_batch_holds_at_most_max_batch_images_and_jobs_join_whole(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(max_batch=4, batch_window_ms=0) as server:
        blocker = _block(server, fake_engine)
        jobs = [_submit(server, prompt=f"p{index}", n=n) for index, n in enumerate((2, 1, 2, 1))]
        fake_engine.resume()
        for job_id in [blocker, *jobs]:
            server.wait_for(job_id, {"succeeded"})
    # p0 (2) + p1 (1) = 3; p2 (2 images) does not fit and is not overtaken by p3: it starts the next pass.
    assert [[request.prompt for request in batch] for batch in fake_engine.batches] == [
        ["blocker"], ["p0", "p1"], ["p2", "p3"]]  # fmt: skip


def test_jobs_arriving_within_the_window_join_and_report_their_batch(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    """The first job waits for partners (window 5 s, but it starts as soon as the batch is full)."""
    with server_factory(max_batch=3, batch_window_ms=5000) as server:
        fake_engine.pause_at(2)
        jobs = [_submit(server, prompt=f"window {index}", seed=index) for index in range(3)]
        poll(fake_engine.paused.is_set, "the batch to hold at step 2")
        views = [server.job(job_id) for job_id in jobs]
        assert all(view["status"] == "running" and view["batch"] == {"jobs": 3, "images": 3} for view in views)
        listed = server.client.get("/v1/jobs", params={"status": "running"}).json()
        assert {job["id"]: job["batch"] for job in listed["items"]} == {job_id: {"jobs": 3, "images": 3}
                                                                      for job_id in jobs}  # fmt: skip
        progress = server.client.get("/sdapi/v1/progress").json()
        assert "in a batch of 3 jobs, 3 images" in progress["textinfo"]
        assert progress["state"]["sampling_steps"] == 4 and progress["state"]["sampling_step"] >= 1
        fake_engine.resume()
        for job_id in jobs:
            server.wait_for(job_id, {"succeeded"})
    assert len(fake_engine.batches) == 1


def test_cancelling_one_job_of_a_batch_leaves_the_others_running(
    server_factory: ServerFactory, fake_engine: FakeEngine
) -> None:
    with server_factory(max_batch=8, batch_window_ms=0) as server:
        blocker = _block(server, fake_engine)
        jobs = [_submit(server, prompt=f"c{index}", seed=index) for index in range(3)]
        fake_engine.resume(then_pause_at=1)
        poll(lambda: len(fake_engine.batches) == 2 and fake_engine.paused.is_set(), "the batch to hold", limit=30)
        assert server.client.post(f"/v1/jobs/{jobs[1]}/cancel").status_code == 200
        cancelled = poll(lambda: (job := server.job(jobs[1]))["status"] != "running" and job, "the cancel", limit=30)
        assert fake_engine.paused.is_set()  # the others are still held, not stopped
        fake_engine.resume()
        finished = [server.wait_for(job_id, {"succeeded", "failed", "cancelled"}) for job_id in (jobs[0], jobs[2])]
        server.wait_for(blocker, {"succeeded"})
    assert cancelled["status"] == "cancelled" and cancelled["result"] is None
    assert [job["status"] for job in finished] == ["succeeded", "succeeded"]
    assert [job["result"]["metadata"]["request"]["prompt"] for job in finished] == ["c0", "c2"]
