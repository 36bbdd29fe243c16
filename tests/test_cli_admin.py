"""`refinery doctor`, `models verify|list|pull` and `export`, run in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdxl_refinery.engine.speed import usable_cpus

ROOT = Path(__file__).resolve().parents[1]

REFINERY = [sys.executable, "-m", "sdxl_refinery"]


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run([*REFINERY, *args], capture_output=True, text=True, env=environment, timeout=300)


def test_doctor_reports_policy_memory_models_and_offline_readiness(tiny_pair: tuple[Path, Path]) -> None:
    done = _run(["doctor", "--json"], REFINERY_DEVICE="cpu", REFINERY_PRECISION="full",
                REFINERY_BASE_MODEL="stabilityai/not-cached", REFINERY_REFINER_MODEL=str(tiny_pair[1]))  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["device"], report["precision"]) == ("cpu", "fp32")
    assert report["why"] == "precision=full forces fp32"
    # base 2,567,463,684 (SDXL's shipped config: not downloaded yet) + encoders + VAE + the tiny refiner's UNet
    assert report["parameters"]["unet"] == 2_567_463_684 and report["parameters"]["refiner unet"] < 10**7
    assert "not downloaded yet" in report["parameters_from"] and "its folder's configs" in report["parameters_from"]
    assert report["weights_bytes_needed"] == 4 * sum(report["parameters"].values())
    assert report["memory_available_bytes"] > 0 and isinstance(report["fits"], bool)
    assert report["models_present"] == {"base": False, "refiner": True}
    assert report["offline"] is True and report["offline_ready"] is False
    # the plan the engine would start under here (CPU: no offload), and its speed plan
    assert report["memory_plan"].startswith(("resident", "sliced")) and "GiB free" in report["memory_plan"]
    if not report["fits"]:
        assert report["memory_plan"].startswith("sliced")
    assert report["speed_plan"] == [f"threads={usable_cpus()}"]
    human = _run(["doctor"], REFINERY_DEVICE="cpu", REFINERY_PRECISION="full", REFINERY_COMPILE="on",
                 REFINERY_THREADS="1")  # fmt: skip
    assert "Precision:  fp32  (precision=full forces fp32)" in human.stdout
    assert "Speed:      threads=1, compiled(frozen)" in human.stdout and "Plan:" in human.stdout


def test_doctor_describes_the_tiny_pair_when_it_is_configured() -> None:
    done = _run(["doctor", "--json"], REFINERY_DEVICE="cpu", REFINERY_PRECISION="full", REFINERY_BASE_MODEL="tiny",
                REFINERY_REFINER_MODEL="tiny")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["parameters_from"] == "the tiny random-weight pair"
    assert sum(report["parameters"].values()) < 10**7 and report["weights_bytes_needed"] < 2**27 and report["fits"]
    human = _run(["doctor"], REFINERY_BASE_MODEL="tiny", REFINERY_REFINER_MODEL="tiny")
    assert " M parameters" in human.stdout and "MiB in" in human.stdout and "Writing" not in human.stderr


def test_doctor_bad_precision_exits_2() -> None:
    done = _run(["doctor"], REFINERY_PRECISION="fp8")
    assert done.returncode == 2 and "precision: must be one of" in done.stderr


def test_export_round_trip_and_verify(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    single = tmp_path / "base.safetensors"
    done = _run(["export", str(tiny_pair[0]), str(single)])
    assert done.returncode == 0, done.stderr
    assert f"wrote sdxl-base single file {single}" in done.stdout
    verified = _run(["models", "verify", str(single)])
    assert verified.returncode == 0, verified.stderr
    assert "kind: sdxl-base (single file" in verified.stdout and "components: complete" in verified.stdout
    assert len(verified.stdout.split("hash: ")[1].split()[0]) == 10
    back = tmp_path / "back"
    assert _run(["export", str(single), str(back)]).returncode == 0
    original = load_file(tiny_pair[0] / "unet" / "diffusion_pytorch_model.safetensors")
    restored = load_file(back / "unet" / "diffusion_pytorch_model.safetensors")
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


def test_verify_reports_a_missing_component(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    single = tmp_path / "refiner.safetensors"
    assert _run(["export", str(tiny_pair[1]), str(single)]).returncode == 0
    tensors = load_file(single)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(single), "pt") as handle:
        metadata = handle.metadata()
    dropped = next(key for key in tensors if key.startswith("first_stage_model.decoder"))
    del tensors[dropped]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=metadata)
    done = _run(["models", "verify", str(tmp_path / "broken.safetensors")])
    assert done.returncode == 1
    assert f"problem: missing tensor {dropped}" in done.stdout and "components: INCOMPLETE" in done.stdout


def test_pull_offline_fails_clearly(tmp_path: Path) -> None:
    done = _run(["models", "pull"], HF_HOME=str(tmp_path))
    assert done.returncode == 1
    assert "base model stabilityai/stable-diffusion-xl-base-1.0: download failed" in " ".join(done.stderr.split())


def test_models_list_shows_the_configured_pair(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    done = _run(["models", "list"], REFINERY_BASE_MODEL=str(tiny_pair[0]), HF_HOME=str(tmp_path), COLUMNS="300")
    assert done.returncode == 0
    assert "base" in done.stdout and str(tiny_pair[0]) in done.stdout


def test_a_run_says_up_front_what_it_will_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from sdxl_refinery import admin

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    notice = admin.download_notice("stabilityai/stable-diffusion-xl-base-1.0",
                                   "stabilityai/stable-diffusion-xl-refiner-1.0")  # fmt: skip
    assert notice is not None and "about 13 GB" in notice and str(tmp_path / "hub") in notice
    assert "--base tiny --refiner tiny" in notice
    assert admin.download_notice("tiny", "tiny") is None


def test_the_smoke_run_renders_the_full_recipe_small() -> None:
    """`make generate MODEL=tiny` proves the install in seconds: the same 50 + 30 steps, at 256x256."""
    done = subprocess.run(["make", "-n", "generate", "MODEL=tiny"], cwd=ROOT, capture_output=True, text=True,
                          check=True)  # fmt: skip
    command = done.stdout[done.stdout.rindex("refinery generate") :]
    assert "--base tiny --refiner tiny" in command and "--size 256x256" in command and "--steps" not in command
    default = subprocess.run(["make", "-n", "generate"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "--size" not in default.stdout[default.stdout.rindex("refinery generate") :]


def test_models_list_and_doctor_show_what_each_file_of_the_models_folder_is(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from safetensors.torch import save_file

    from sdxl_refinery.engine.export import export_to_single_file

    folder = tmp_path / "models"
    (folder / "xl").mkdir(parents=True)
    export_to_single_file(tiny_pair[0], folder / "xl" / "fine.safetensors")
    (folder / "xl" / "fine.sampling.json").write_text('{"prediction_type": "v_prediction"}')
    save_file({"cond_stage_model.transformer.x": torch.zeros(1)}, folder / "old.safetensors")
    env = {"REFINERY_MODELS_DIR": str(folder), "HF_HOME": str(tmp_path), "COLUMNS": "300",
           "REFINERY_BASE_MODEL": "tiny", "REFINERY_REFINER_MODEL": "tiny"}  # fmt: skip
    listed = _run(["models", "list"], **env)
    assert listed.returncode == 0, listed.stderr
    assert "xl/fine" in listed.stdout and "single file, v-prediction" in listed.stdout
    assert "old" in listed.stdout and "unusable" in listed.stdout and "Stable Diffusion 1.x/2.x" in listed.stdout
    report = json.loads(_run(["doctor", "--json"], REFINERY_DEVICE="cpu", **env).stdout)
    assert report["models_folder"] == str(folder)
    assert [row["reference"] for row in report["folder_models"]] == ["xl/fine", "old"]
    human = _run(["doctor"], REFINERY_DEVICE="cpu", **env).stdout
    assert "xl/fine: base (single file, v-prediction" in human
