"""Serving many at once: K concurrent HTTP clients against a real `refinery serve`, batching on and off.

    python bench/throughput.py --clients 1 2 4 8 --jobs 3 --size 128 --json bench/results/throughput-cpu-2core.json
    python bench/throughput.py --quick        # seconds: checks the script works (the tests run it)
    python bench/throughput.py --unet-batches 1 2 4 --size 512   # the full-size UNet's cost per image per batch

Each setting starts its own server process (same models, same data folder layout) and runs, for each K,
K clients that each submit `--jobs` jobs one after another (POST /v1/jobs, then its event stream until done): distinct
prompts and seeds, one compatible shape, as many users of one service send. Reported per K: images per
minute over the whole burst, and p50/p95 latency from submission to the finished job. Batching on
(`REFINERY_MAX_BATCH`, `REFINERY_BATCH_WINDOW_MS`) is measured against one job at a time
(`REFINERY_MAX_BATCH=1`) in the same run, on the same machine, and reported as ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

READY_LIMIT_S = 600  # loading a full-size pair takes its time; the tiny pair seconds


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(data: Path, model: tuple[str, str], device: str, batch: int, window_ms: int, log: Path) -> tuple[
        subprocess.Popen[bytes], str]:  # fmt: skip
    port = _free_port()
    environment = {**os.environ, "REFINERY_BASE_MODEL": model[0], "REFINERY_REFINER_MODEL": model[1],
                   "REFINERY_DEVICE": device, "REFINERY_MAX_BATCH": str(batch), "REFINERY_PREVIEW_EVERY": "0",
                   "REFINERY_BATCH_WINDOW_MS": str(window_ms), "REFINERY_MAX_QUEUE": "1000",
                   "HF_HUB_OFFLINE": "1"}  # fmt: skip
    with log.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "sdxl_refinery", "serve", "--port", str(port), "--data-dir",
                                    str(data)], env=environment, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_LIMIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(url + "/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server was not ready within {READY_LIMIT_S} s; see {log}")


def _client(url: str, body: dict[str, Any], jobs: int, first_seed: int, latencies: list[float]) -> None:
    with httpx.Client(base_url=url, timeout=600) as client:
        for index in range(jobs):
            started = time.perf_counter()
            payload = {**body, "prompt": f"{body['prompt']} #{first_seed + index}", "seed": first_seed + index}
            answer = client.post("/v1/jobs", json=payload)
            answer.raise_for_status()
            job_id = answer.json()["id"]
            _wait_done(client, job_id)
            latencies.append(time.perf_counter() - started)


def _wait_done(client: httpx.Client, job_id: str) -> None:
    """Follow the job's Server-Sent Events until `done` (a watcher, as the web page is; no polling load)."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        event = ""
        for line in events.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "done":
                status = json.loads(line.split(":", 1)[1])["status"]
                if status != "succeeded":
                    raise RuntimeError(f"job {job_id} {status}")
                return
    raise RuntimeError(f"the event stream of job {job_id} ended before it was done")


def _burst(url: str, body: dict[str, Any], clients: int, jobs: int) -> dict[str, float]:
    latencies: list[float] = []
    threads = [threading.Thread(target=_client, args=(url, body, jobs, 1000 * k, latencies)) for k in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if len(latencies) != clients * jobs:
        raise RuntimeError("a client failed; see the server log")
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"images_per_minute": 60 * len(latencies) * body["n"] / elapsed, "p50_s": statistics.median(ordered),
            "p95_s": p95, "elapsed_s": elapsed, "jobs": len(latencies)}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Both settings, every K, in one run."""
    body = {"prompt": "a lighthouse on a cliff", "width": args.size, "height": args.size, "n": 1,
            "num_inference_steps": args.steps, "refiner_steps": args.refiner_steps}  # fmt: skip
    settings = {"one_at_a_time": (1, 0), "batching": (args.max_batch, args.window_ms)}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (batch, window) in settings.items():
            log = Path(scratch) / f"{name}.log"
            process, url = _serve(Path(scratch) / name, (args.base, args.refiner), args.device, batch, window, log)
            try:
                _burst(url, body, 1, 1)  # warm-up: the first run pays for lazy initialisation
                results[name] = {str(k): _burst(url, body, k, args.jobs) for k in args.clients}
            finally:
                process.terminate()
                process.wait(timeout=60)
            print(f"{name}: " + ", ".join(f"K={k} {r['images_per_minute']:.1f} img/min p95 {r['p95_s']:.2f} s"
                                          for k, r in results[name].items()))  # fmt: skip
    ratios = {k: {"throughput": results["batching"][k]["images_per_minute"] /
                  results["one_at_a_time"][k]["images_per_minute"],
                  "p95_vs_lone_job": results["batching"][k]["p95_s"] / results["one_at_a_time"]["1"]["p50_s"]
                  if "1" in results["one_at_a_time"] else None}
              for k in results["batching"]}  # fmt: skip
    return {"settings": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
            "machine": _machine(), "body": body,
            "results": results, "ratios": ratios}  # fmt: skip


def unet_batches(size: int, batches: list[int], device: str) -> dict[str, Any]:
    """What a batch costs where batching happens: one call of the full-size SDXL base UNet (random weights,
    fp32 on CPU, fp16 elsewhere; classifier-free guidance doubles the batch) for n images at once, against n
    single-image calls, in the same process."""
    import torch

    from bench.run import _one_component, _timed, _unet_step

    dtype = torch.float32 if device == "cpu" else torch.float16
    unet = _one_component("sdxl-base", "unet", dtype, device)
    seconds = {str(n): _timed(_unet_step(unet, n, size // 8, device, dtype, 6), 1) for n in batches}
    single = seconds[str(batches[0])] / batches[0]
    return {"size": size, "dtype": str(dtype), "seconds_per_call": seconds,
            "seconds_per_image": {n: value / int(n) for n, value in seconds.items()},
            "batch_gain": {n: single / (value / int(n)) for n, value in seconds.items()}}  # fmt: skip


def _machine() -> dict[str, Any]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--refiner", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--jobs", type=int, default=3, help="jobs each client submits, one after another")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--refiner-steps", type=int, default=6)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window-ms", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="the tiny pair, few steps, K=1 and 2")
    parser.add_argument("--unet-batches", type=int, nargs="+", metavar="N",
                        help="instead: the full-size UNet cost per image at these batches, at --size")  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.jobs, args.size, args.steps, args.refiner_steps = [1, 2], 1, 64, 3, 2
    if args.unet_batches:
        figures = {"unet": unet_batches(args.size, args.unet_batches, args.device), "machine": _machine()}
        print(json.dumps(figures["unet"], indent=2))
    else:
        figures = measure(args)
        print(json.dumps(figures["ratios"], indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
