"""Bounded load test of `refinery serve` on loopback: many clients submitting, polling, streaming, cancelling.

    python bench/load.py --clients 100 --seconds 60 --json load.json

Starts its own server on the tiny pair (or targets --url), runs for a fixed time with a fixed number of
clients, then reports status codes, errors, p50/p99 latency of status calls and the server's memory.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SMALL_JOB = {"prompt": "load", "width": 256, "height": 256, "num_inference_steps": 2, "refiner_steps": 1}
TERMINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class LoadReport:
    clients: int
    seconds: float
    status_codes: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    status_latencies: list[float] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        latencies = sorted(self.status_latencies) or [0.0]
        return {
            "clients": self.clients, "seconds": self.seconds,
            "requests": sum(self.status_codes.values()),
            "status_codes": {str(code): count for code, count in sorted(self.status_codes.items())},
            "errors": self.errors[:20], "error_count": len(self.errors),
            "jobs_accepted": len(self.accepted), "jobs_cancelled_by_clients": len(self.cancelled),
            "status_call_latency_ms": {
                "p50": round(1000 * statistics.median(latencies), 2),
                "p99": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
                "count": len(self.status_latencies),
            },
            "server_rss_mb": {"first": self.rss_mb[0] if self.rss_mb else None,
                              "last": self.rss_mb[-1] if self.rss_mb else None,
                              "max": max(self.rss_mb) if self.rss_mb else None},
        }  # fmt: skip


async def _client(http: httpx.AsyncClient, report: LoadReport, deadline: float, rng: random.Random) -> None:
    while time.monotonic() < deadline:
        try:
            answer = await http.post("/v1/jobs", json=SMALL_JOB)
            report.status_codes[answer.status_code] += 1
            if answer.status_code == 429:
                await asyncio.sleep(min(float(answer.headers.get("Retry-After", "1")), 1.0) * rng.random())
                continue
            if answer.status_code != 202:
                report.errors.append(f"submit {answer.status_code}: {answer.text[:200]}")
                continue
            job_id = answer.json()["id"]
            report.accepted.append(job_id)
            action = rng.choice(("poll", "poll", "stream", "cancel"))
            if action == "cancel":
                cancel = await http.post(f"/v1/jobs/{job_id}/cancel")
                report.status_codes[cancel.status_code] += 1
                report.cancelled.append(job_id)
            elif action == "stream":
                async with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
                    report.status_codes[stream.status_code] += 1
                    async for line in stream.aiter_lines():
                        if line.startswith("event: done") or time.monotonic() > deadline + 30:
                            break
            else:
                while time.monotonic() < deadline + 30:
                    started = time.perf_counter()
                    status = await http.get(f"/v1/jobs/{job_id}")
                    report.status_latencies.append(time.perf_counter() - started)
                    report.status_codes[status.status_code] += 1
                    if status.status_code != 200 or status.json()["status"] in TERMINAL:
                        break
                    await asyncio.sleep(0.2)
        except httpx.HTTPError as error:
            report.errors.append(f"{type(error).__name__}: {error}")


async def _sample_memory(pid: int | None, report: LoadReport, deadline: float) -> None:
    if pid is None:
        return
    import psutil

    process = psutil.Process(pid)
    while time.monotonic() < deadline:
        report.rss_mb.append(round(process.memory_info().rss / 2**20, 1))
        await asyncio.sleep(1.0)


async def run_load(url: str, clients: int, seconds: float, server_pid: int | None = None, seed: int = 0) -> LoadReport:
    """Drive `clients` concurrent clients against `url` for `seconds`, then wait for the queue to drain."""
    report = LoadReport(clients, seconds)
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        rng = random.Random(seed)
        tasks = [_client(http, report, deadline, random.Random(rng.random())) for _ in range(clients)]
        await asyncio.gather(_sample_memory(server_pid, report, deadline + 5), *tasks)
        drain_deadline = time.monotonic() + 120
        while (await http.get("/v1/workers")).json()["queue_depth"] > 0 and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.5)
    return report


@contextlib.contextmanager
def tiny_server(port: int, max_queue: int) -> Iterator[subprocess.Popen[bytes]]:
    """`refinery serve` on the tiny pair in a temporary data folder."""
    with tempfile.TemporaryDirectory(prefix="refinery-load-") as folder:
        environment = {**os.environ, "REFINERY_BASE_MODEL": "tiny", "REFINERY_REFINER_MODEL": "tiny",
                       "REFINERY_MAX_QUEUE": str(max_queue), "REFINERY_PREVIEW_EVERY": "0",
                       "HF_HUB_OFFLINE": "1"}  # fmt: skip
        process = subprocess.Popen([sys.executable, "-m", "sdxl_refinery", "serve", "--port", str(port),
                                    "--data-dir", str(Path(folder) / "data")], env=environment,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the server did not become ready")
                time.sleep(0.2)
            yield process
        finally:
            process.terminate()
            process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--url", help="an existing server (default: start one on the tiny pair)")
    parser.add_argument("--port", type=int, default=8790)
    parser.add_argument("--max-queue", type=int, default=50)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    if args.url:
        report = asyncio.run(run_load(args.url, args.clients, args.seconds))
    else:
        with tiny_server(args.port, args.max_queue) as server:
            report = asyncio.run(run_load(f"http://127.0.0.1:{args.port}", args.clients, args.seconds, server.pid))
    summary = summary_with_machine(report)
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


def summary_with_machine(report: LoadReport) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    return {"machine": {"cpu": cpu, "cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"), **report.summary()}


if __name__ == "__main__":
    main()
