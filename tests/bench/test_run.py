"""bench/run.py --quick keeps working: the tiny pair, both sides, every figure with unit and ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_writes_table_json_and_plot(tmp_path: Path) -> None:
    report_path, plot_path = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--device", "cpu", "--json",
                           str(report_path), "--plot", str(plot_path)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "end_to_end_s_n1 @256" in done.stdout and "smoke run only" in done.stdout
    report = json.loads(report_path.read_text())
    assert report["ours"]["device"] == "cpu" and report["baseline"]["dtype"] == "float32"
    for name in ("base_step_s_n1 @256", "refiner_step_s_n1 @256", "decode_s @256", "end_to_end_s_n1 @256",
                 "images_per_minute_n4 @256", "peak RSS"):  # fmt: skip
        figure = report["figures"][name]
        assert figure["unit"] and figure["ours"] > 0 and figure["baseline"] > 0 and figure["speedup"] > 0
    # The baseline decodes to pixels and encodes again between stages; Refinery hands latents over.
    assert report["baseline"]["resolutions"]["256"]["encode_s"] > 0 == report["ours"]["resolutions"]["256"]["encode_s"]
    assert plot_path.stat().st_size > 1000
