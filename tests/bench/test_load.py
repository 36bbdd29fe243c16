"""A short run of bench/load.py: concurrent clients submit, poll, stream and cancel; nothing but 429 fails."""

from __future__ import annotations

import asyncio

from bench.load import run_load

from ..server.conftest import ServerFactory


def test_short_load_run_has_no_errors_and_loses_no_job(real_server_factory: ServerFactory) -> None:
    # The tiny SDXL pair, not the fake engine: jobs must take real time for the queue to fill.
    with real_server_factory(max_queue=8, preview_every=0) as server:
        report = asyncio.run(run_load(server.url, clients=20, seconds=5))
        assert report.errors == []
        assert set(report.status_codes) <= {200, 202, 429}
        assert report.status_codes[202] == len(report.accepted) > 0
        assert report.status_codes[429] > 0  # 20 clients against a queue of 8: back-pressure was exercised
        final = {job_id: server.client.get(f"/v1/jobs/{job_id}").json()["status"] for job_id in report.accepted}
        assert set(final.values()) <= {"succeeded", "cancelled"}
        assert all(final[job_id] in ("succeeded", "cancelled") for job_id in report.cancelled)
        summary = report.summary()
        assert summary["status_call_latency_ms"]["count"] > 0
