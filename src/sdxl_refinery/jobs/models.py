"""Jobs: one accepted request, its status, progress and outcome."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..request import GenerationRequest
from ..results import STAGE_NAMES
from ..upscale_request import UpscaleRequest

JobRequest = GenerationRequest | UpscaleRequest  # what a job runs: a generation, or an upscale (A1111's extras)


def request_from_record(data: dict[str, Any]) -> JobRequest:
    """A job's request as stored (JSON), back as the request it was: an upscale carries `kind: upscale`."""
    return UpscaleRequest(**data) if data.get("kind") == "upscale" else GenerationRequest(**data)


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Whether a job in this state will never change again."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass
class JobProgress:
    """Where a running job is: stage 1 (base), 2 (refiner) or 3 (upscale), step of total, ETA in seconds."""

    stage: int = 0
    step: int = 0
    total: int = 0
    percent: float = 0.0
    eta: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "stage_name": STAGE_NAMES.get(self.stage, "waiting"),
                "step": self.step, "total": self.total, "percent": round(self.percent, 2),
                "eta_seconds": None if self.eta is None else round(self.eta, 1)}  # fmt: skip


@dataclass
class Job:
    """An accepted request and everything known about it.

    Attributes:
        result: on success, `images` (file names under the job's folder), `seeds` and `metadata`.
        attempts: how many times a worker started it (more than 1 after a crash).
    """

    id: str
    request: JobRequest
    status: JobStatus = JobStatus.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    progress: JobProgress = field(default_factory=JobProgress)
    result: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    interrupt_requested: bool = False  # stop within one step and keep the image as it stands (A1111 /interrupt)
    worker: str | None = None
    client: str | None = None  # which API accepted it: native, openai, a1111, web
    owner: str | None = None  # the name of the API key that submitted it (None: an open server, or before keys)
    fingerprint: str | None = None  # who asked for what (see store.Dedup): retries attach to this job
    answered: bool = False  # a synchronous call delivered its images to a connected client
    batch: dict[str, int] | None = None  # while running with others in one pass: {"jobs": k, "images": m}

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex
