"""Scale-out measured: the same burst of jobs through 1 and then 2 Celery workers, each pinned to one core.

    python bench/scale_out.py --jobs 8 --size 128 --json bench/results/scale-out-cpu-2core-tiny.json

Per setting: a fresh redis-server (Debian's package), one `refinery serve --backend celery` API server and N
`refinery worker` processes, worker i pinned to core i (`taskset`, one torch thread each), all on the tiny
pair. Once every worker reports its models loaded, the burst (`--jobs` jobs with distinct seeds, the
documented 50 + 30 recipe) is submitted at once and timed until every job succeeded. Reported: images per
minute per setting and the ratio, with the CPU named; both settings run in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name

LIMIT_S = 1800


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Any, what: str, limit: float = LIMIT_S) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"gave up waiting for {what}")


def _burst(workers: int, jobs: int, size: int, folder: Path) -> dict[str, Any]:
    """Start redis, an API server and `workers` pinned workers; time `jobs` jobs; stop everything."""
    redis_port, api_port = _free_port(), _free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    environment = {**os.environ, "REFINERY_BASE_MODEL": "tiny", "REFINERY_REFINER_MODEL": "tiny",
                   "REFINERY_REDIS_URL": redis_url, "REFINERY_DATA_DIR": str(folder / "data"), "HF_HUB_OFFLINE": "1",
                   "REFINERY_PREVIEW_EVERY": "0", "REFINERY_MAX_QUEUE": "1000", "REFINERY_THREADS": "1",
                   "OMP_NUM_THREADS": "1", "REFINERY_PRECISION": "full"}  # fmt: skip
    redis = [str(shutil.which("redis-server")), "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(folder)]  # fmt: skip
    processes = [subprocess.Popen(redis, stdout=subprocess.DEVNULL)]
    url = f"http://127.0.0.1:{api_port}"
    try:
        with (folder / "api.log").open("ab") as sink:
            processes.append(subprocess.Popen([sys.executable, "-m", "sdxl_refinery", "serve", "--backend", "celery",
                                               "--port", str(api_port)], env=environment, stdout=sink,
                                              stderr=subprocess.STDOUT))  # fmt: skip
        for index in range(workers):
            with (folder / f"worker-{index}.log").open("ab") as sink:
                processes.append(subprocess.Popen(["taskset", "-c", str(index), sys.executable, "-m", "sdxl_refinery",
                                                   "worker", "--device", "cpu", "--name", f"w{index}"], env=environment,
                                                  stdout=sink, stderr=subprocess.STDOUT))  # fmt: skip
        _wait(lambda: len([w for w in httpx.get(f"{url}/v1/workers").json()["workers"] if w["loaded"]]) >= workers,
              "the workers to load")  # fmt: skip
        body = {"prompt": "a lighthouse at dusk", "width": size, "height": size}
        started = time.perf_counter()
        ids = [httpx.post(f"{url}/v1/jobs", json={**body, "seed": seed}).json()["id"] for seed in range(jobs)]

        def all_done() -> bool:
            states = [httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] for job_id in ids]
            if "failed" in states or "cancelled" in states:
                raise RuntimeError(f"a job did not succeed: {states}")
            return all(state == "succeeded" for state in states)

        _wait(all_done, "the burst to finish")
        seconds = time.perf_counter() - started
        ran_on = sorted({httpx.get(f"{url}/v1/jobs/{job_id}").json()["worker"] for job_id in ids})
        return {"workers": workers, "jobs": jobs, "seconds": round(seconds, 2),
                "images_per_minute": round(60 * jobs / seconds, 2), "ran_on": ran_on}  # fmt: skip
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs two cores (one per worker)")
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as folder:
            rows.append(_burst(workers, arguments.jobs, arguments.size, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
    report = {"machine": {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0))}, "models": "tiny pair",
              "recipe": "50 base + 30 refiner steps", "size": arguments.size, "settings": rows,
              "ratio_2_to_1": round(rows[1]["images_per_minute"] / rows[0]["images_per_minute"], 2)}  # fmt: skip
    print(json.dumps(report, indent=1))
    if arguments.json:
        arguments.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
