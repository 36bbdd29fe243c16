"""The worker loop: claim a job, run it on the service, record every step and the outcome.

One worker per service (one device). Images go where the storage says, under
names fixed by the job, so a job re-run after a crash overwrites its own files
and never leaves duplicates.
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

from ..errors import Cancelled, RefineryError, StorageError, StoreUnavailable, is_disk_full, is_read_only
from ..request import CancelToken, Progress
from ..service import ImageService
from ..steps import plan_steps
from .metrics import QueueMetrics
from .models import Job, JobProgress, JobStatus
from .storage import ImageStorage
from .store import JobStore

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.5  # seconds between progress rows written to the store
RETRY_FIRST_SECONDS = 0.5  # a failing job store is retried after this, doubling up to RETRY_MAX_SECONDS
RETRY_MAX_SECONDS = 10.0
CANCEL_POLL_INTERVAL = 0.25  # seconds between checks of the store's cancel and interrupt flags (other processes')
# After a failed progress write or flag check, the running job leaves the store alone this long: a lost
# Redis answers each call only when its timeout runs out, and the steps should not wait on that.
STORE_QUIET_SECONDS = 5.0


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
        self.totals = plan_steps(job.request).totals
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
    ) -> None:
        self.store = store
        self.service = service
        self.storage = storage
        self.events = events
        self.metrics = metrics
        self.preview_every = preview_every
        self.name = name
        self.poll_cancel = poll_cancel
        self.current: tuple[str, CancelToken] | None = None
        self.store_fault: StoreUnavailable | None = None  # the job store fails: cleared when a store call works
        self.output_fault: StorageError | None = None  # images cannot be written: cleared when a job succeeds
        self._wake = asyncio.Event()

    @property
    def problem(self) -> RefineryError | None:
        """What keeps this worker from running jobs now (the server's /ready says it), or None."""
        return self.store_fault or self.output_fault

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
        """Stop the job if it is the one running here; True if it was."""
        if self.current is not None and self.current[0] == job_id:
            self.current[1].cancel()
            return True
        return False

    def interrupt(self, job_id: str) -> bool:
        """Stop the job within one step, keeping its image, if it is the one running here; True if it was."""
        if self.current is not None and self.current[0] == job_id:
            self.current[1].interrupt()
            return True
        return False

    async def run(self, stop: asyncio.Event, claim_next: Callable[[str], Job | None]) -> None:
        """Claim and run jobs until `stop` is set; a job still running then goes back to the queue.

        Store faults never end the loop: they are retried with backoff and shown by `problem`
        (the server's /ready) until they pass.
        """
        while not stop.is_set():
            if self.output_fault is not None:  # a full disk: give it time before the job is tried again
                await _pause(RETRY_MAX_SECONDS, stop)
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
            await self.process(job, stop)

    async def process(self, job: Job, stop: asyncio.Event | None = None) -> None:
        """Run one claimed job to its end and record the outcome."""
        token = CancelToken()
        self.current = (job.id, token)
        output = self.storage.output_path(job.id)
        for stale in output.parent.glob(".*.part"):  # a previous attempt died while writing
            stale.unlink()
        reporter = _JobReporter(job, self.store, self.events, self.metrics, token, self.poll_cancel,
                                self._store_failed)  # fmt: skip
        self.events.publish(job.id, "started", {"attempt": job.attempts})
        started = time.perf_counter()
        status, outcome = await self._generate(job, output, token, reporter, stop)
        if self.metrics is not None:
            self.metrics.finished.labels(status.value).inc()
            self.metrics.job_seconds.labels(status.value).observe(time.perf_counter() - started)
        self.current = None
        self.events.drop_preview(job.id)
        if status is not JobStatus.QUEUED:
            self.events.publish(job.id, "done", {"status": status.value, **outcome})

    async def _generate(
        self, job: Job, output: Path, token: CancelToken, reporter: _JobReporter, stop: asyncio.Event | None
    ) -> tuple[JobStatus, dict[str, Any]]:
        try:
            result = await self.service.generate(
                job.request, output_path=output, on_progress=reporter, cancel=token,
                preview_every=self.preview_every,
            )  # fmt: skip
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
        except Exception as error:
            log.exception("Job %s failed", job.id)
            message = f"internal error: {type(error).__name__}: {error}"
            await self.stored(self.store.fail, job.id, message, stop=stop)
            return JobStatus.FAILED, {"error": message}
        outcome = {"images": [Path(p).name for p in result.paths], "seeds": result.seeds,
                   "metadata": result.metadata()}  # fmt: skip
        await self.stored(self.store.succeed, job.id, outcome, stop=stop)
        self.output_fault = None
        return JobStatus.SUCCEEDED, {"result": outcome}

    def stop_current(self) -> None:
        """At shutdown: stop the running job within one step (it is re-queued, not cancelled)."""
        if self.current is not None:
            self.current[1].cancel()


async def _pause(seconds: float, stop: asyncio.Event | None) -> None:
    """Wait `seconds`, or less if `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
