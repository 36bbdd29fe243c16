"""The worker loop: claim a job and the queued jobs that can share its pass, run them on the service,
record every step and each job's outcome.

One worker per service (one device). The job at the head of the queue is always
taken first; partners (the same batch key, `batching.batch_key`) join it from
anywhere in the queue, oldest first, up to `max_batch` images, waiting at most
`batch_window` seconds for them. Images go where the storage says, under names
fixed by the job, so a job re-run after a crash overwrites its own files and
never leaves duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ..batching import BatchCall, batch_key, default_batching
from ..errors import (
    Cancelled,
    GenerationFailed,
    RefineryError,
    StorageError,
    StoreUnavailable,
    is_disk_full,
    is_read_only,
)
from ..png import check_writable_folder
from ..request import CancelToken, GenerationRequest, GenerationResult, Progress
from ..service import ImageService
from ..steps import plan_steps
from ..upscale_run import UpscaleResult
from .metrics import QueueMetrics
from .models import Job, JobProgress, JobStatus
from .storage import ImageStorage
from .store import JobLost, JobStore

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress rows written to the store
RETRY_FIRST_SECONDS = 0.5  # a failing job store is retried after this, doubling up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 10.0
CANCEL_POLL_INTERVAL = 0.25  # seconds between checks of the store's cancel and interrupt flags (other processes')
# After a failed progress write or flag check, the running job leaves the store alone this long: a lost
# Redis answers each call only when its timeout runs out, and the steps should not wait on that.
STORE_QUIET_SECONDS = 5.0
PARTNER_POLL_SECONDS = 0.02  # within the batch window, how often the queue is looked at again (no wake from Celery)


class EventSink(Protocol):
    """Where a worker sends live events: in-process (`JobEvents`) or Redis (`RedisEventSink`)."""

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None: ...

    def set_preview(self, job_id: str, png: bytes) -> None: ...

    def drop_preview(self, job_id: str) -> None: ...


class _JobReporter:
    """Turns engine progress into store rows, events, previews and metrics for one job."""

    def __init__(
        self,
        job: Job,
        store: JobStore,
        events: EventSink,
        metrics: QueueMetrics | None,
        token: CancelToken,
        poll_cancel: bool,
        on_store_fault: Callable[[StoreUnavailable], None],
    ) -> None:
        self.job = job
        self.on_store_fault = on_store_fault
        self.store = store
        self.events = events
        self.metrics = metrics
        self.token = token
        self.poll_cancel = poll_cancel
        self._last_poll = 0.0
        self.totals = plan_steps(job.request).totals if isinstance(job.request, GenerationRequest) else {3: 1}
        self._last_write = 0.0
        self._unwritten: JobProgress | None = None
        self._last_step = time.perf_counter()
        self._quiet_until = 0.0  # no store calls before this (perf_counter), after a store fault

    def __call__(self, progress: Progress) -> None:
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.step_seconds.labels(progress.stage_name).observe(now - self._last_step)
        self._last_step = now
        self.totals[progress.stage] = progress.total
        done = progress.step + (self.totals[1] if progress.stage == 2 else 0)
        overall = JobProgress(progress.stage, progress.step, progress.total,
                              100.0 * done / max(sum(self.totals.values()), 1), progress.eta)  # fmt: skip
        self._unwritten = overall
        quiet = now < self._quiet_until
        if not quiet and (now - self._last_write >= PROGRESS_WRITE_INTERVAL or progress.step == progress.total):
            self._last_write = now
            try:
                self.flush()
            except StoreUnavailable as error:  # progress can wait; the job goes on
                self._store_fault(error)
            except JobLost as error:  # taken back while this worker was silent: stop, another attempt runs it
                log.warning("%s; stopping this attempt", error)
                self.token.cancel()
        self.events.publish(self.job.id, "progress", overall.as_dict())
        if progress.preview is not None:
            buffer = io.BytesIO()
            progress.preview.save(buffer, format="PNG")
            self.events.set_preview(self.job.id, buffer.getvalue())
            self.events.publish(self.job.id, "preview", {"step": progress.step, "stage": progress.stage})
        if self.poll_cancel and not quiet and now - self._last_poll >= CANCEL_POLL_INTERVAL:
            self._last_poll = now
            try:
                if self.store.cancel_requested(self.job.id):
                    self.token.cancel()  # the engine stops at the end of this step
                elif self.store.interrupt_requested(self.job.id):
                    self.token.interrupt()  # the engine stops at the end of this step and keeps the image
            except StoreUnavailable as error:
                self._store_fault(error)

    def _store_fault(self, error: StoreUnavailable) -> None:
        self._quiet_until = time.perf_counter() + STORE_QUIET_SECONDS
        self.on_store_fault(error)

    def flush(self) -> None:
        """Store the latest progress if the write interval held it back (so a stopped job shows where it stopped)."""
        if self._unwritten is not None:
            self.store.update_progress(self.job.id, self._unwritten)
            self._unwritten = None


class Worker:
    """Runs queued jobs one at a time on one service.

    Args:
        store: where jobs are claimed and recorded.
        service: the image service of this worker's device.
        storage: where images are written.
        events: live event fan-out.
        metrics: Prometheus metrics, or None.
        preview_every: a live preview every this many steps (0: none).
        name: this worker's name in job records.
        poll_cancel: check the store's cancel and interrupt flags every step (when they come from other processes).
        max_batch: images one pass may hold (jobs join whole); None: the device's default
            (`batching.default_batching`), read once the models are loaded.
        batch_window: seconds a claimed job waits at most for partners; None: the device's default.
    """

    def __init__(
        self,
        store: JobStore,
        service: ImageService,
        storage: ImageStorage,
        events: EventSink,
        metrics: QueueMetrics | None = None,
        preview_every: int = 5,
        name: str = "worker-0",
        poll_cancel: bool = False,
        max_batch: int | None = None,
        batch_window: float | None = None,
    ) -> None:
        self.store = store
        self.service = service
        self.storage = storage
        self.events = events
        self.metrics = metrics
        self.preview_every = preview_every
        self.name = name
        self.poll_cancel = poll_cancel
        self.max_batch = max_batch
        self.batch_window = batch_window
        self.current: dict[str, CancelToken] = {}  # the jobs running now (one pass), by id
        self.store_fault: StoreUnavailable | None = None  # the job store fails: cleared when a store call works
        self.output_fault: StorageError | None = None  # images cannot be written: cleared when a job succeeds
        self._wake = asyncio.Event()

    @property
    def problem(self) -> RefineryError | None:
        """What keeps this worker from running jobs now (the server's /ready says it), or None."""
        return self.store_fault or self.output_fault

    def output_works(self) -> bool:
        """Probe the images folder now (a file created and removed); a working one clears `output_fault` and
        wakes the worker from its pause, so that space coming back is used at once, not at the next retry."""
        if self.output_fault is None:
            return True
        try:
            check_writable_folder(self.storage.output_path("0" * 32))
        except StorageError:
            return False
        log.warning("Images can be written again")
        self.output_fault = None
        self.wake()
        return True

    def _store_failed(self, error: StoreUnavailable) -> None:
        if self.store_fault is None or str(self.store_fault) != str(error):
            log.error("Job store unavailable: %s; retrying until it works", error)
        self.store_fault = error

    async def stored(self, function: Callable[..., Any], *args: Any, stop: asyncio.Event | None = None) -> Any:
        """A store call, retried with backoff until it works (or `stop` is set: then StoreUnavailable)."""
        delay = RETRY_FIRST_SECONDS
        while True:
            try:
                result = await asyncio.to_thread(function, *args)
            except StoreUnavailable as error:
                self._store_failed(error)
                if stop is not None and stop.is_set():
                    raise
                await _pause(delay, stop)
                delay = min(delay * 2, RETRY_MAX_SECONDS)
                continue
            if self.store_fault is not None:
                log.warning("Job store works again")
                self.store_fault = None
            return result

    def wake(self) -> None:
        """A job was queued: stop waiting."""
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Stop the job if it is running here (the others of its pass go on); True if it was."""
        token = self.current.get(job_id)
        if token is not None:
            token.cancel()
        return token is not None

    def interrupt(self, job_id: str) -> bool:
        """Stop the job within one step, keeping its image, if it is running here; True if it was."""
        token = self.current.get(job_id)
        if token is not None:
            token.interrupt()
        return token is not None

    def batching(self) -> tuple[int, float]:
        """Images per pass and the window in seconds: the settings', else the loaded device's defaults."""
        device = str(self.service.describe().get("device", "cpu"))
        default_size, default_window_ms = default_batching(device)
        size = self.max_batch if self.max_batch is not None else default_size
        window = self.batch_window if self.batch_window is not None else default_window_ms / 1000
        return size, window

    async def run(self, stop: asyncio.Event, claim_next: Callable[[str], Job | None]) -> None:
        """Claim and run jobs until `stop` is set; a job still running then goes back to the queue.

        Store faults never end the loop: they are retried with backoff and shown by `problem`
        (the server's /ready) until they pass.
        """
        while not stop.is_set():
            if self.output_fault is not None:  # a full disk: give it time (or a probe that works) before a retry
                self._wake.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=RETRY_MAX_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
            try:
                job = await self.stored(claim_next, self.name, stop=stop)
            except StoreUnavailable:
                return  # stopping while the store fails: recovery at the next start takes over
            if job is None:
                self._wake.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                for waiter in waiters:
                    waiter.cancel()
                continue
            jobs = await self.gather(job, stop)
            await self.process_batch(jobs, stop)

    async def gather(self, first: Job, stop: asyncio.Event | None = None) -> list[Job]:
        """`first` and the queued jobs that can share its pass, claimed for this worker: up to the batch size
        in images, waiting at most the batch window for them (never longer, whatever arrives)."""
        key = batch_key(first.request)
        size, window = self.batching()
        jobs = [first]
        room = size - first.request.n
        if key is None or room <= 0:
            return jobs
        deadline = time.monotonic() + window
        while True:
            partners = await self.stored(self.store.claim_partners, self.name, key, room, stop=stop)
            jobs += partners
            room -= sum(job.request.n for job in partners)
            left = deadline - time.monotonic()
            if room <= 0 or left <= 0 or (stop is not None and stop.is_set()):
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=min(left, PARTNER_POLL_SECONDS))
        if len(jobs) > 1:
            batch = {"jobs": len(jobs), "images": sum(job.request.n for job in jobs)}
            await self.stored(self.store.mark_batch, [job.id for job in jobs], batch, stop=stop)
            for job in jobs:
                job.batch = batch
            log.info("Jobs %s share one pass (%d images)", ", ".join(job.id for job in jobs), batch["images"])
        return jobs

    async def process(self, job: Job, stop: asyncio.Event | None = None) -> None:
        """Run one claimed job to its end and record the outcome."""
        await self.process_batch([job], stop)

    async def process_batch(self, jobs: list[Job], stop: asyncio.Event | None = None) -> None:
        """Run claimed jobs of one batch key in shared passes to their end and record each one's outcome: each
        has its own progress, previews, token and result."""
        calls: list[BatchCall] = []
        reporters: list[_JobReporter] = []
        for job in jobs:
            token = CancelToken()
            self.current[job.id] = token
            output = self.storage.output_path(job.id, job.attempts)
            for stale in output.parent.glob(".*.part"):  # a previous attempt died while writing
                stale.unlink()
            reporter = _JobReporter(job, self.store, self.events, self.metrics, token, self.poll_cancel,
                                    self._store_failed)  # fmt: skip
            reporters.append(reporter)
            # Jobs came over HTTP: their model and LoRA names resolve only within the folders, now as at submission.
            calls.append(BatchCall(job.request, output, reporter, token, self.preview_every, allow_paths=False))
            self.events.publish(job.id, "started", {"attempt": job.attempts, "batch": job.batch})
        started = time.perf_counter()
        released: set[str] = set()  # jobs of the pass cancelled and recorded so while the others go on
        watcher = asyncio.create_task(self._release_cancelled(jobs, released, stop)) if len(jobs) > 1 else None
        try:
            outcomes: list[GenerationResult | UpscaleResult | RefineryError] = await self.service.generate_batch(calls)
        except RefineryError as error:  # not one pass after all (a bug if it happens): every job fails
            outcomes = [error] * len(jobs)
        except Exception as error:  # recorded on every job of the pass, never lost
            log.exception("Jobs %s failed", ", ".join(job.id for job in jobs))
            outcomes = [GenerationFailed(f"internal error: {type(error).__name__}: {error}")] * len(jobs)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
        for job, reporter, outcome in zip(jobs, reporters, outcomes, strict=True):
            if job.id in released:
                self.current.pop(job.id, None)
                continue
            try:
                status, recorded = await self._record(job, outcome, reporter, stop)
            except JobLost as error:  # another attempt holds the job: its record and images are that one's
                log.warning("%s; this attempt's outcome is dropped", error)
                self.current.pop(job.id, None)
                continue
            if self.metrics is not None:
                self.metrics.finished.labels(status.value).inc()
                self.metrics.job_seconds.labels(status.value).observe(time.perf_counter() - started)
            self.current.pop(job.id, None)
            self.events.drop_preview(job.id)
            if status is not JobStatus.QUEUED:
                self.events.publish(job.id, "done", {"status": status.value, **recorded})

    async def _release_cancelled(self, jobs: list[Job], released: set[str], stop: asyncio.Event | None) -> None:
        """While a pass runs: a job cancelled by request is recorded cancelled at once (the engine lets its slot
        go at its next step and discards its images); the other jobs of the pass go on."""
        while stop is None or not stop.is_set():
            await asyncio.sleep(CANCEL_POLL_INTERVAL)
            if stop is not None and stop.is_set():
                return  # shutting down: the tokens were cancelled to requeue the jobs, not to cancel them
            for job in jobs:
                token = self.current.get(job.id)
                if job.id in released or token is None or not token.cancelled:
                    continue
                released.add(job.id)
                await self.stored(self.store.mark_cancelled, job.id, stop=stop)
                self.events.drop_preview(job.id)
                self.events.publish(job.id, "done", {"status": JobStatus.CANCELLED.value,
                                                     "error": "cancelled by request"})  # fmt: skip
                if self.metrics is not None:
                    self.metrics.finished.labels(JobStatus.CANCELLED.value).inc()

    async def _record(
        self,
        job: Job,
        outcome: GenerationResult | UpscaleResult | RefineryError,
        reporter: _JobReporter,
        stop: asyncio.Event | None,
    ) -> tuple[JobStatus, dict[str, Any]]:
        """Store one job's outcome: succeeded, failed, cancelled, or back in the queue (shutdown, full disk)."""
        try:
            if isinstance(outcome, RefineryError):
                raise outcome
            result = outcome
        except Cancelled:
            await self.stored(reporter.flush, stop=stop)
            if stop is not None and stop.is_set() and not (await self.stored(self.store.get, job.id)).cancel_requested:
                await self.stored(self.store.requeue, job.id, stop=stop)  # shutting down: run it again later
                log.info("Job %s re-queued at shutdown", job.id)
                return JobStatus.QUEUED, {}
            await self.stored(self.store.mark_cancelled, job.id, stop=stop)
            return JobStatus.CANCELLED, {"error": "cancelled by request"}
        except StorageError as error:
            if not (is_disk_full(error) or is_read_only(error)):
                await self.stored(self.store.fail, job.id, str(error), stop=stop)
                return JobStatus.FAILED, {"error": str(error)}
            # A full or read-only disk is not the job's fault: it goes back to the queue and runs once it can.
            log.error("Job %s back in the queue: %s", job.id, error)
            self.output_fault = error
            await self.stored(self.store.requeue, job.id, stop=stop)
            return JobStatus.QUEUED, {}
        except RefineryError as error:
            await self.stored(self.store.fail, job.id, str(error), stop=stop)
            return JobStatus.FAILED, {"error": str(error)}
        stored = {"images": [Path(p).name for p in result.paths], "seeds": result.seeds,
                  "metadata": result.metadata()}  # fmt: skip
        await self.stored(self.store.succeed, job.id, stored, stop=stop)
        self.output_fault = None
        return JobStatus.SUCCEEDED, {"result": stored}

    def stop_current(self) -> None:
        """At shutdown: stop the running jobs within one step (they are re-queued, not cancelled)."""
        for token in self.current.values():
            token.cancel()


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
