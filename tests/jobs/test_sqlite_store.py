"""The SQLite job store: ordering, atomic claims, recovery, cancellation, limits."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sdxl_refinery import GenerationRequest
from sdxl_refinery.jobs.models import JobProgress, JobStatus
from sdxl_refinery.jobs.sqlite_store import SQLiteJobStore
from sdxl_refinery.jobs.store import JobNotFound, QueueFull

REQUEST = GenerationRequest(prompt="x", width=256, height=256)


@pytest.fixture
def store(tmp_path: Path) -> SQLiteJobStore:
    return SQLiteJobStore(tmp_path / "jobs.sqlite3")


def test_jobs_are_claimed_oldest_first_with_positions(store: SQLiteJobStore) -> None:
    jobs = [store.create(REQUEST, "native") for _ in range(3)]
    assert [store.position(job.id) for job in jobs] == [1, 2, 3]
    claimed = store.claim_next("w")
    assert claimed is not None and claimed.id == jobs[0].id and claimed.status is JobStatus.RUNNING
    assert claimed.attempts == 1 and store.position(jobs[1].id) == 1 and store.position(claimed.id) is None
    assert store.depth() == 3 and store.counts()["running"] == 1


def test_two_workers_never_claim_the_same_job(store: SQLiteJobStore) -> None:
    for _ in range(40):
        store.create(REQUEST, "native")
    claimed: list[str] = []

    def worker(name: str) -> None:
        while (job := store.claim_next(name)) is not None:
            claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 40 and len(set(claimed)) == 40


def test_recovery_requeues_running_jobs_first_and_keeps_finished_ones(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    done, running, waiting = (store.create(REQUEST, "native") for _ in range(3))
    assert store.claim_next("w") is not None
    store.succeed(done.id, {"images": ["image.png"]})
    assert store.claim_next("w") is not None  # `running`
    store.update_progress(running.id, JobProgress(1, 5, 50, 6.0, 12.0))
    store.close()  # the process dies here

    reopened = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    assert reopened.recover() == [running.id]
    assert reopened.get(running.id).status is JobStatus.QUEUED
    assert reopened.get(done.id).result == {"images": ["image.png"]}
    again = reopened.claim_next("w2")
    assert again is not None and again.id == running.id and again.attempts == 2  # run again from the start
    assert again.progress.step == 0
    assert reopened.position(waiting.id) == 1


def test_cancel_queued_now_and_running_by_flag(store: SQLiteJobStore) -> None:
    running, queued = store.create(REQUEST, "native"), store.create(REQUEST, "native")
    store.claim_next("w")
    assert store.cancel(queued.id).status is JobStatus.CANCELLED
    flagged = store.cancel(running.id)
    assert flagged.status is JobStatus.RUNNING and flagged.cancel_requested
    store.mark_cancelled(running.id)
    assert store.get(running.id).status is JobStatus.CANCELLED
    store.succeed(running.id, {})  # a finished job never changes again
    assert store.get(running.id).status is JobStatus.CANCELLED


def test_interrupt_flags_only_the_running_job(store: SQLiteJobStore) -> None:
    running, queued = store.create(REQUEST, "a1111"), store.create(REQUEST, "a1111")
    store.claim_next("w")
    assert not store.interrupt(queued.id).interrupt_requested and not store.interrupt_requested(queued.id)
    flagged = store.interrupt(running.id)
    assert flagged.status is JobStatus.RUNNING and flagged.interrupt_requested and not flagged.cancel_requested
    assert store.interrupt_requested(running.id) and not store.cancel_requested(running.id)
    with pytest.raises(JobNotFound):
        store.interrupt("0" * 32)


def test_an_interrupt_asked_before_a_crash_ends_the_job_on_recovery(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = store.create(REQUEST, "a1111")
    store.claim_next("w")
    store.interrupt(job.id)
    assert store.recover() == [job.id]
    assert store.get(job.id).status is JobStatus.CANCELLED  # its partial image died with the process


def test_a_job_left_running_by_three_crashes_is_failed_not_run_again(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job, other = store.create(REQUEST, "native"), store.create(REQUEST, "native")
    for crash in (1, 2):
        assert store.claim_next("w").id == job.id  # type: ignore[union-attr]
        assert store.recover(crash_limit=3) == [job.id]  # the process died while it ran
        assert store.get(job.id).status is JobStatus.QUEUED, crash
    assert store.claim_next("w").id == job.id  # type: ignore[union-attr]
    assert store.recover(crash_limit=3) == [job.id]
    failed = store.get(job.id)
    assert failed.status is JobStatus.FAILED and "crashed the worker 3 times" in (failed.error or "")
    assert store.claim_next("w").id == other.id  # type: ignore[union-attr]  # the queue goes on


def test_a_cancel_asked_before_a_crash_is_honoured_on_recovery(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    job = store.create(REQUEST, "native")
    store.claim_next("w")
    store.cancel(job.id)
    assert store.recover() == [job.id]
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_queue_limit_and_missing_jobs(store: SQLiteJobStore) -> None:
    store.create(REQUEST, "native", max_depth=2)
    store.create(REQUEST, "native", max_depth=2)
    with pytest.raises(QueueFull) as caught:
        store.create(REQUEST, "native", max_depth=2)
    assert caught.value.depth == 2 and caught.value.retry_after > 0
    with pytest.raises(JobNotFound):
        store.get("0" * 32)
    page, total = store.list(0, 1)
    assert total == 2 and len(page) == 1


def test_create_or_attach_finds_only_the_job_its_dedup_accepts(tmp_path: Path) -> None:
    from sdxl_refinery.jobs.store import Dedup

    store = SQLiteJobStore(tmp_path / "jobs.sqlite3")
    request = GenerationRequest(prompt="x", width=256, height=256)
    retry = Dedup("fp-1", window_seconds=3600, unanswered_only=True)
    job, attached = store.create_or_attach(request, "openai", None, retry)
    assert not attached and job.fingerprint == "fp-1"
    again, attached = store.create_or_attach(request, "openai", None, retry)
    assert attached and again.id == job.id  # queued: a retry attaches
    store.claim_next("w")
    store.succeed(job.id, {"images": [], "seeds": [], "metadata": {}})
    assert store.create_or_attach(request, "openai", None, retry)[0].id == job.id  # done, not yet delivered
    store.mark_answered(job.id)
    fresh, attached = store.create_or_attach(request, "openai", None, retry)
    assert not attached and fresh.id != job.id  # delivered: asking again renders again
    keyed = Dedup("fp-1", window_seconds=3600, unanswered_only=False)
    store.claim_next("w")
    store.fail(fresh.id, "boom")
    assert not store.create_or_attach(request, "openai", None, keyed)[1]  # a failed job is never reused
    expired = Dedup("fp-2", window_seconds=0.0, unanswered_only=False)
    first = store.create_or_attach(request, "native", None, expired)[0]
    assert store.create_or_attach(request, "native", None, expired)[0].id != first.id
    store.close()
