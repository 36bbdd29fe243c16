"""Prometheus metrics of the queue and the runs, in a registry of their own (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class QueueMetrics:
    """Jobs by status, queue depth, seconds per denoising step, job duration."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge("refinery_jobs", "Jobs in each state", ["status"], registry=self.registry)
        self.finished = Counter("refinery_jobs_finished", "Runs that ended, by outcome", ["status"],
                                registry=self.registry)  # fmt: skip
        self.depth = Gauge("refinery_queue_depth", "Jobs queued or running", registry=self.registry)
        self.attached = Counter("refinery_requests_attached", "Requests answered by an earlier job instead of a new "
                                "one, by why", ["reason"], registry=self.registry)  # fmt: skip
        self.step_seconds = Histogram(
            "refinery_step_seconds", "Seconds per denoising step", ["stage"], registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )  # fmt: skip
        self.job_seconds = Histogram(
            "refinery_job_duration_seconds", "Seconds from start to end of a run", ["status"], registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
        )  # fmt: skip

    def observe_store(self, counts: dict[str, int]) -> None:
        """Set the per-state and depth gauges from the store's counts."""
        for status, count in counts.items():
            self.jobs.labels(status).set(count)
        self.depth.set(counts.get("queued", 0) + counts.get("running", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
