"""bench/run.py --quick keeps working: the tiny pair, both sides, every figure with unit and ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sdxl_refinery.engine.speed import usable_cpus

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_script_runs_every_stage_end_to_end_on_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh as a lent GPU machine runs it, on the tiny pair: smoke, precision, benchmark table, and
    throughput against real servers with concurrent clients, batching against one job at a time."""
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("torch ")
    assert "end_to_end_s_n1 @256" in done.stdout and "smoke run only" in done.stdout
    report = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert report["ours"]["device"] == "cpu" and report["baseline"]["dtype"] == "float32"
    assert report["ours"]["optimizations"] == [f"threads={usable_cpus()}"]  # the engine's CPU speed plan
    for name in ("base_step_s_n1 @256", "refiner_step_s_n1 @256", "decode_s @256", "end_to_end_s_n1 @256",
                 "images_per_minute_n4 @256", "peak RSS"):  # fmt: skip
        figure = report["figures"][name]
        assert figure["unit"] and figure["ours"] > 0 and figure["baseline"] > 0 and figure["speedup"] > 0
    # The baseline decodes to pixels and encodes again between stages; Refinery hands latents over.
    assert report["baseline"]["resolutions"]["256"]["encode_s"] > 0 == report["ours"]["resolutions"]["256"]["encode_s"]
    assert (tmp_path / "bench-cpu.png").stat().st_size > 1000
    # The engine end to end on the device, against CPU: on CPU itself, the very same pixels.
    smoke = json.loads((tmp_path / "smoke-cpu.json").read_text())["cases"]
    assert smoke["fp32_on_device_vs_cpu"]["max_pixel_diff_vs_cpu"] == 0
    assert smoke["default_policy"]["refined"] and smoke["default_policy"]["base_steps"] == 50
    # bf16 against fp32 on CPU: close images, and a module trace that names where rounding shows.
    precision = json.loads((tmp_path / "precision-cpu.json").read_text())
    assert precision["compared"] == "bf16 against full (fp32)"
    assert 0 < precision["pixel_difference_vs_fp32"]["half_default_speed_plan"]["base_1_step"]["max"] <= 16
    trace = precision["trace_one_base_step"]
    assert trace["modules_traced"] > 100
    parted = trace["first_divergences"]
    assert all(row["module"].startswith(("text_encoder", "unet")) and row["finite"] for row in parted)
    throughput = json.loads((tmp_path / "throughput-cpu-quick.json").read_text())
    for setting in ("one_at_a_time", "batching"):
        rows = throughput["results"][setting]
        assert {clients: row["jobs"] for clients, row in rows.items()} == {"1": 1, "2": 2}
        assert all(row["images_per_minute"] > 0 and 0 < row["p50_s"] <= row["p95_s"] for row in rows.values())
    assert set(throughput["ratios"]) == {"1", "2"} and throughput["machine"]["cores"]
    stages = (tmp_path / "gpu-cpu.log").read_text()
    assert "== smoke: exit 0" in stages and "== precision: exit 0" in stages and "== eager: exit 0" in stages


def test_the_options_benchmark_measures_each_option_against_plain(tmp_path: Path) -> None:
    report_path = tmp_path / "options.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "options.py"), "--quick", "--device", "cpu",
                           "--variants", "channels-last", "fused-qkv", "--json", str(report_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["variant"]: row for row in json.loads(report_path.read_text())["variants"]}
    threads = f"threads={usable_cpus()}"
    assert rows["plain"]["optimizations"] == [threads] and rows["plain"]["speedup_vs_plain"] == 1.0
    assert rows["channels-last"]["optimizations"] == [threads, "channels-last"]
    assert rows["fused-qkv"]["optimizations"] == [threads, "fused-qkv"]
    assert all(row["step_s"] > 0 and row["speedup_vs_plain"] > 0 for row in rows.values())
    assert "fused-qkv" in done.stdout


def test_the_attention_benchmark_checks_every_kernel_against_fp32(tmp_path: Path) -> None:
    report_path = tmp_path / "attention.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--quick", "--repeats", "1",
                           "--json", str(report_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(report_path.read_text())["rows"]
    assert {row["kernel"] for row in rows} == {"sdpa (flash)", "matmul + fp32 softmax", "flex_attention (compiled)"}
    # every kernel is exact attention: bf16 rounding only, far from a wrong result (outputs are of order 1)
    assert all(row["seconds"] > 0 and row["max_error"] < 0.1 for row in rows)


def test_the_samplers_benchmark_times_each_sampler_against_the_first(tmp_path: Path) -> None:
    report_path = tmp_path / "samplers.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "samplers.py"), "--quick", "--device", "cpu",
                           "--samplers", "Euler", "Heun", "--json", str(report_path)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["sampler"]: row for row in json.loads(report_path.read_text())["rows"]}
    assert rows["Euler"]["step_vs_first"] == 1.0 and rows["Euler"]["evaluations_per_step"] == 1.0
    assert rows["Heun"]["evaluations_per_step"] > 1.0  # its own work: two model evaluations a step
    assert all(row["evaluation_s"] > 0 and 0 < row["scheduler_share"] < 1 for row in rows.values())


def test_the_lora_benchmark_times_plain_fused_and_unfused_in_one_run(tmp_path: Path) -> None:
    report_path = tmp_path / "loras.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "loras.py"), "--quick", "--device", "cpu",
                           "--json", str(report_path)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"plain", "fused", "unfused (PEFT layers)"}
    assert all(row["step_s"] > 0 for row in rows.values())
    assert report["weights_restored_exactly"] is True and report["load_s"] > 0


def test_share_check_bench_runs_quick(tmp_path: Path) -> None:
    report_path = tmp_path / "share.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "share_check.py"), "--quick", "--dtype", "fp32",
                           "--json", str(report_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(report_path.read_text())
    assert [row["module"] for row in report["rows"]] == ["text_encoder_2", "vae"]
    assert all(row["identical_seconds"] >= 0 and row["parameters"] > 0 for row in report["rows"])
