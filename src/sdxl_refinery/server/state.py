"""What the routes share: one object built by the app factory, reached through dependencies."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

from anyio import CapacityLimiter
from fastapi import Depends, Request

from ..config import Settings
from ..errors import StoreUnavailable, is_disk_full
from ..jobs.events import JobEvents
from ..jobs.metrics import QueueMetrics
from ..jobs.models import Job, JobRequest
from ..jobs.storage import FolderStorage, ImageStorage
from ..jobs.store import Dedup, JobStore
from ..jobs.worker import Worker
from ..limits import Limits, enforce_limits
from ..request import GenerationRequest
from ..service import ImageService
from ..service_checks import check_images
from .keys import OPEN, ApiKeys, Caller
from .offload import checks_limiter
from .signing import UrlSigner

LISTED_PROMPT_CHARS = 300  # prompts in job listings are cut here; the job itself has them whole


class IdempotencyConflict(Exception):
    """An Idempotency-Key that named one request arrived again with another."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"this Idempotency-Key was used for job {job_id} with a different request")


@dataclass
class AppState:
    """The server's parts: settings, the job store, the service and its worker, events and metrics."""

    settings: Settings
    store: JobStore
    service: ImageService
    events: JobEvents
    metrics: QueueMetrics
    worker: Worker | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    load_error: str | None = None
    storage: ImageStorage = field(init=False)

    signer: UrlSigner = field(init=False)
    keys: ApiKeys = field(init=False)
    checks: CapacityLimiter = field(default_factory=checks_limiter)  # threads checking bodies (offload.py)

    def __post_init__(self) -> None:
        self.storage = FolderStorage(self.settings.data_dir / "images")
        self.signer = UrlSigner(self.settings.data_dir, self.settings.url_ttl_seconds)
        self.keys = ApiKeys(self.settings.api_key, self.settings.api_keys_file, self.settings.max_queue)

    @property
    def limits(self) -> Limits:
        s = self.settings
        return Limits(s.max_width, s.max_height, s.max_steps, s.max_images, s.max_prompt_tokens)

    def submit(self, request: JobRequest, client: str, dedup: Dedup | None = None, caller: Caller = OPEN) -> Job:
        """Check the server's limits, persist the job of `caller` (or attach to the one `dedup` names, which is
        the caller's own: its fingerprint names the key), wake the worker.

        Raises:
            InvalidRequest: a field over this server's caps, a `clip_skip` deeper than its text encoders, a
                LoRA that is unknown, unreadable or made for another model (only names from the LoRA folder: no
                paths over HTTP), or an upscaler that is not in the upscaler folder or cannot be used.
            QueueFull: the queue is at `max_queue`, or the caller's jobs at its share of it.
            IdempotencyConflict: an Idempotency-Key reused for a different request.
            StoreUnavailable: the job store or the image disk fails now (503, or 507 for a full disk).
        """
        check_images(request)
        if isinstance(request, GenerationRequest):
            enforce_limits(request, self.limits)
            self.service.resolve_models(request, allow_paths=False)
            self.service.check_loras(request, allow_paths=False)
            self.service.check_clip_skip(request)
            self.service.check_controlnets(request)
            self.service.check_image_prompts(request)
        self.service.check_upscalers(request)
        if self.worker is not None and not self.worker.output_works():  # probed now: freed space counts at once
            problem = self.worker.output_fault
            full = problem is not None and is_disk_full(problem)
            raise StoreUnavailable(f"not accepting jobs until this passes: {problem}", disk_full=full)
        # A store fault is not checked from a flag: the write below tries the store itself (503/507 if it fails).
        if dedup is not None:
            job, attached = self.store.create_or_attach(request, client, self.settings.max_queue, dedup, caller.owner)
            if attached:
                if job.request != request:
                    raise IdempotencyConflict(job.id)
                self.metrics.attached.labels("idempotency-key" if not dedup.unanswered_only else "retry").inc()
                return job
        else:
            job = self.store.create(request, client, self.settings.max_queue, caller.owner)
        self.metrics.depth.set(self.store.depth())
        self.events.publish(job.id, "queued", {"position": self.store.position(job.id)})
        if self.worker is not None:
            self.worker.wake()
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now, or a running one within one step.

        Raises:
            JobNotFound.
        """
        job = self.store.cancel(job_id)
        if self.worker is not None:
            self.worker.cancel(job_id)
        if job.status.terminal:
            self.events.publish(job_id, "done", {"status": job.status.value, "error": job.error})
        return job

    def interrupt(self, job_id: str) -> Job:
        """Stop a running job within one step and keep its image as it stands; other jobs are left as they are.

        Raises:
            JobNotFound.
        """
        job = self.store.interrupt(job_id)
        if self.worker is not None and job.interrupt_requested:
            self.worker.interrupt(job_id)
        return job

    async def wait(self, job_id: str, timeout: float | None) -> Job:
        """The job once it is terminal, or as it is when `timeout` seconds have passed (None: no limit)."""
        queue = self.events.subscribe(job_id)
        deadline = asyncio.get_running_loop().time() + (timeout if timeout is not None else float("inf"))
        try:
            while True:
                job = await asyncio.to_thread(self.store.get, job_id)
                remaining = deadline - asyncio.get_running_loop().time()
                if job.status.terminal or remaining <= 0:
                    return job
                try:  # wake on this job's end, and re-read the store at least every second
                    message = await asyncio.wait_for(queue.get(), timeout=min(1.0, remaining))
                    while message["event"] != "done" and not queue.empty():
                        message = queue.get_nowait()
                except TimeoutError:
                    pass
        finally:
            self.events.unsubscribe(job_id, queue)

    def image_url(self, base_url: str, job_id: str, name: str, signed: bool = False) -> str:
        """An image's URL; `signed` adds an expiring signature that opens it without the API key."""
        path = f"/v1/images/{job_id}/{name}"
        return f"{base_url.rstrip('/')}{path}" + (f"?{self.signer.query(path)}" if signed else "")

    def job_view(self, job: Job, base_url: str = "", brief: bool = False) -> dict[str, Any]:
        """A job as the native API shows it; `brief` (listings) shortens its prompts and leaves out the
        recipe's copy in the metadata, so a page of jobs stays small (`GET /v1/jobs/{id}` has it all)."""
        view: dict[str, Any] = {
            "id": job.id, "status": job.status.value, "created": job.created, "started": job.started,
            "finished": job.finished, "attempts": job.attempts, "client": job.client, "worker": job.worker,
            "request": job.request.recorded(), "progress": job.progress.as_dict(),
            "position": self.store.position(job.id) if job.status.value == "queued" else None,
            "error": job.error, "result": None,
            "batch": job.batch, "owner": job.owner,
        }  # fmt: skip
        if job.result is not None:
            view["result"] = {**job.result,
                              "urls": [self.image_url(base_url, job.id, n) for n in job.result["images"]]}  # fmt: skip
        if brief:
            view["brief"] = True
            for name in ("prompt", "negative_prompt"):
                text = view["request"].get(name) or ""  # an upscale job has no words
                if len(text) > LISTED_PROMPT_CHARS:
                    view["request"][name] = text[:LISTED_PROMPT_CHARS] + "…"
            if view["result"] is not None and "metadata" in view["result"]:
                view["result"]["metadata"] = {k: v for k, v in view["result"]["metadata"].items() if k != "request"}
        return view


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.refinery
    return state


State = Annotated[AppState, Depends(get_state)]
