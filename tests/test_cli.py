"""The `refinery` command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl_refinery.png import read_metadata

REFINERY = [sys.executable, "-m", "sdxl_refinery"]


def _run(args: list[str], tiny_pair: tuple[Path, Path], **env: str) -> subprocess.CompletedProcess[str]:
    base, refiner = tiny_pair
    environment = {
        **os.environ,
        "REFINERY_BASE_MODEL": str(base),
        "REFINERY_REFINER_MODEL": str(refiner),
        "REFINERY_PRECISION": "full",
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    return subprocess.run([*REFINERY, *args], capture_output=True, text=True, env=environment, timeout=300)


def test_generate_writes_png_and_prints_paths_seeds_timings(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    done = _run(
        [
            "generate",
            "a red barn",
            "--size",
            "256x256",
            "--steps",
            "6",
            "--refiner-steps",
            "3",
            "--seed",
            "11",
            "-n",
            "2",
            "-o",
            str(tmp_path / "barn.png"),
        ],
        tiny_pair,
    )
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path / 'barn-1.png'}  seed=11" in done.stdout
    assert f"{tmp_path / 'barn-2.png'}  seed=12" in done.stdout
    assert "2 image(s), refined, cpu fp32; base" in done.stdout and "total" in done.stdout
    assert "Stage 2/2 refiner" in done.stderr  # the progress bar
    assert read_metadata(tmp_path / "barn-2.png")["seeds"] == [11, 12]


def test_output_folder_uses_the_name_pattern(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    done = _run(
        [
            "generate",
            "Misty Forest!",
            "--size",
            "256x256",
            "--steps",
            "2",
            "--refiner-steps",
            "1",
            "--seed",
            "3",
            "-o",
            str(tmp_path),
            "--name",
            "{prompt}-{seed}",
        ],
        tiny_pair,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "misty-forest-3.png").is_file()


def test_from_reproduces_the_same_pixels(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    original = tmp_path / "a.png"
    assert (
        _run(
            [
                "generate",
                "a boat",
                "--size",
                "256x256",
                "--steps",
                "5",
                "--refiner-steps",
                "2",
                "--mode",
                "handoff",
                "--switch-at",
                "0.6",
                "-N",
                "fog",
                "--sampler",
                "dpm++ 2m sde karras",  # any case, A1111's combined name: a stochastic sampler reproduces too
                "--clip-skip",
                "2",
                "-o",
                str(original),
            ],
            tiny_pair,
        ).returncode
        == 0
    )
    again = tmp_path / "b.png"
    done = _run(
        ["generate", "--from", str(original), "-o", str(again)],
        tiny_pair,
        REFINERY_PRECISION="auto",
        REFINERY_BASE_MODEL="elsewhere/none",
    )
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(original)), np.asarray(Image.open(again)))
    recipe = read_metadata(again)["request"]
    assert (recipe["sampler"], recipe["scheduler"], recipe["clip_skip"]) == ("DPM++ 2M SDE", "Karras", 2)
    assert "Sampler: DPM++ 2M SDE, Schedule type: Karras" in read_metadata(again)["parameters"]
    changed = tmp_path / "c.png"
    assert _run(["generate", "--from", str(original), "--seed", "99", "-o", str(changed)], tiny_pair).returncode == 0
    assert read_metadata(changed)["seeds"] == [99]
    assert read_metadata(changed)["request"]["negative_prompt"] == "fog"


def test_bad_input_exits_2_naming_the_flag_typed(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    for args, said in (
        [["x", "--size", "1000x1001"], "--size '1000x1001': "],
        [["x", "--steps", "0"], "--steps 0: "],
        [["x", "--size", "big"], "--size: must be WIDTHxHEIGHT"],
        [["x", "--mode", "fast"], "--mode 'fast': "],
        [["x", "--device", "gpu"], "--device 'gpu': "],
        [["x", "--sampler", "DPM fast"], "--sampler 'DPM fast': "],
        [["x", "--sampler", "DDIM", "--schedule", "Karras"], "--schedule 'Karras': "],
        [["  "], "PROMPT ' ': must not be empty"],
    ):
        done = _run(["generate", *args, "-o", str(tmp_path)], tiny_pair)
        assert done.returncode == 2, (args, done.stderr)
        assert f"error: {said}" in " ".join(done.stderr.split()), (args, done.stderr)
        if "--sampler" in said:  # the valid names are listed
            assert "DPM++ 2M" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_typos_get_the_nearest_value_that_works(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    for args, hint in (
        [["--schedule", "karas"], "did you mean 'Karras'?"],
        [["--sampler", "dpmpp_2m"], "did you mean 'DPM++ 2M'?"],
        [["--size", "500x500"], "the nearest size that works is 496x496"],
        [["--size", "1023x768"], "the nearest size that works is 1024x768"],
    ):
        done = _run(["generate", "x", *args, "-o", str(tmp_path)], tiny_pair)
        assert done.returncode == 2 and hint in " ".join(done.stderr.split()), (args, done.stderr)


def test_output_that_is_not_a_png_or_exists_is_refused_before_any_work(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    jpeg = _run(["generate", "x", "-o", str(tmp_path / "out.jpg")], tiny_pair)
    assert jpeg.returncode == 2 and "images are written as PNG" in " ".join(jpeg.stderr.split())
    assert not (tmp_path / "out.jpg").exists()  # no folder named out.jpg either
    existing = tmp_path / "kept.png"
    existing.write_bytes(b"mine")
    refused = _run(["generate", "x", "-o", str(existing)], tiny_pair)
    assert refused.returncode == 2 and "add --overwrite" in " ".join(refused.stderr.split())
    assert existing.read_bytes() == b"mine"
    replaced = _run(["generate", "x", "--steps", "2", "--refiner-steps", "1", "--size", "64x64", "-o", str(existing),
                     "--overwrite"], tiny_pair)  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert existing.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_version(tiny_pair: tuple[Path, Path]) -> None:
    done = _run(["--version"], tiny_pair)
    assert done.returncode == 0 and done.stdout.strip() == "refinery 0.1.0"


def test_missing_model_exits_1(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    done = _run(["generate", "x", "--base", str(tmp_path / "nothing"), "-o", str(tmp_path / "x.png")], tiny_pair)
    assert done.returncode == 1 and "base model" in done.stderr


@pytest.mark.parametrize(
    ("base", "refiner", "said"),
    [("models/sd_xl_base_1.0.safetensors", None, "no such file"),  # a path, not a Hub id
     ("{tmp}/notes.safetensors", None, "not a safetensors"),
     ("{tmp}/refiner.safetensors", None, "is an sdxl-refiner checkpoint, expected sdxl-base"),
     ("{tmp}/model.ckpt", "tiny", "refused: pickle checkpoints"),  # the refusal, not "tiny comes as a pair"
     (None, "{tmp}/nothing/", "no such folder")],
)  # fmt: skip
def test_a_bad_model_fails_before_anything_loads(
    tiny_pair: tuple[Path, Path], tmp_path: Path, base: str | None, refiner: str | None, said: str
) -> None:
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    if "refiner.safetensors" in (base or ""):
        _run(["export", str(tiny_pair[1]), str(tmp_path / "refiner.safetensors")], tiny_pair)
    arguments = ["generate", "x", "-v", "-o", str(tmp_path / "x.png")]
    for flag, value in (("--base", base), ("--refiner", refiner)):
        if value is not None:
            arguments += [flag, value.format(tmp=tmp_path)]
    done = _run(arguments, tiny_pair)
    assert done.returncode == 1, done.stderr
    assert said in done.stderr and "Loaded base" not in done.stderr  # refused from paths and headers alone
    assert not list(tmp_path.glob("x*.png"))


def test_no_network_and_no_cache_says_what_to_do(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    done = _run(["generate", "x", "-v", "--base", "stabilityai/stable-diffusion-xl-base-1.0", "--refiner",
                 "stabilityai/stable-diffusion-xl-refiner-1.0", "-o", str(tmp_path)], tiny_pair,
                HF_HOME=str(tmp_path / "hf"))  # fmt: skip
    assert done.returncode == 1
    message = " ".join(done.stderr.split())  # rich wraps lines
    assert "not in the local Hugging Face cache" in message and "about 13 GB" in message
    assert "refinery models pull" in message and "--base tiny --refiner tiny" in message
    assert "Traceback" in done.stderr  # -v shows where it failed


def test_ctrl_c_cancels_and_leaves_no_file(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, refiner = tiny_pair
    environment = {
        **os.environ,
        "REFINERY_BASE_MODEL": str(base),
        "REFINERY_REFINER_MODEL": str(refiner),
        "HF_HUB_OFFLINE": "1",
    }
    process = subprocess.Popen(
        [*REFINERY, "generate", "x", "--size", "512x512", "--steps", "500", "-v", "-o", str(tmp_path / "x.png")],
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "Stage 1/2" in line:
            break
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "cancelled" in rest
    assert list(tmp_path.iterdir()) == []


def test_info_prints_parameters_and_metadata(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    assert (
        _run(
            [
                "generate",
                "an owl",
                "--size",
                "256x256",
                "--steps",
                "2",
                "--refiner-steps",
                "1",
                "--seed",
                "4",
                "-o",
                str(tmp_path / "owl.png"),
            ],
            tiny_pair,
        ).returncode
        == 0
    )
    done = _run(["info", str(tmp_path / "owl.png")], tiny_pair)
    assert done.returncode == 0
    expected = "an owl\nSteps: 2, Sampler: Euler, Schedule type: Automatic, CFG scale: 8.0, Seed: 4, Size: 256x256"
    assert done.stdout.startswith(expected)
    assert '"refined": true' in done.stdout
    assert _run(["info", str(tmp_path / "none.png")], tiny_pair).returncode == 2


def test_progress_bars_time_each_stage_from_its_own_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """30 refiner steps in 145 s read about 0.21 it/s (not the whole run's rate), and a one-step stage
    shows its time, not 0:00:00."""
    from sdxl_refinery import cli_common as cli
    from sdxl_refinery.request import Progress

    clock = iter([10.0, 155.0, 1.5])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    bars = cli.ProgressBar()
    bars(Progress(1, 50, 50, elapsed=10.0, eta=145.0))  # the base's 50 steps took the first 10 s
    bars(Progress(2, 30, 30, elapsed=155.0, eta=0.0))  # the refiner's 30 took the next 145 s
    base, refiner = (task.fields for task in bars.bar.tasks)
    assert (base["rate"], base["elapsed"]) == ("5.00 it/s", "0:00:10.0")
    assert (refiner["rate"], refiner["elapsed"]) == ("0.21 it/s", "0:02:25")
    one_step = cli.ProgressBar()
    one_step(Progress(1, 1, 1, elapsed=1.5, eta=0.0))  # a one-step run, 1.5 s in
    assert one_step.bar.tasks[0].fields["elapsed"] == "0:00:01.5"


def test_info_never_prints_raw_control_characters(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A PNG from elsewhere can carry terminal escape sequences in its text; `info` shows them escaped."""
    from PIL import PngImagePlugin

    chunks = PngImagePlugin.PngInfo()
    chunks.add_text("parameters", "a \x1b[2J\x1b[31mred\x1b[0m cat\nSteps: 2, Seed: 1")
    chunks.add_text("refinery", json.dumps({"request": {"prompt": "x"}, "seeds": [1]}))
    Image.new("RGB", (8, 8)).save(tmp_path / "odd.png", pnginfo=chunks)
    done = _run(["info", str(tmp_path / "odd.png")], tiny_pair)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "a \\x1b[2J\\x1b[31mred\\x1b[0m cat\nSteps: 2" in done.stdout


def test_generate_help_is_grouped_by_what_each_option_controls(tiny_pair: tuple[Path, Path]) -> None:
    done = _run(["generate", "--help"], tiny_pair, COLUMNS="80", TERM="dumb")
    assert done.returncode == 0
    panels = [line.split("─ ", 1)[1].split(" ─")[0] for line in done.stdout.splitlines() if line.startswith("╭─ ")]
    assert panels[2:] == ["Sampling", "Refiner", "From an image (img2img, inpainting)", "Hires fix", "Device",
                          "Models and LoRAs", "Output"]  # fmt: skip
    hires = done.stdout[done.stdout.index("─ Hires fix ─") : done.stdout.index("─ Device ─")]
    assert "--hires-scale" in hires and "--guidance " not in hires
    assert "hr_resize_x" not in done.stdout and "--hires-width/--hires-height" in " ".join(done.stdout.split())


def test_upscale_with_a_model_writes_the_png_and_refuses_unknown_names(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    from tests.upscaler_files import write_tiny_esrgan

    folder = tmp_path / "upscalers"
    write_tiny_esrgan(folder / "tiny-4x.safetensors")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "in.png")
    done = _run(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "big.png"), "--model", "tiny-4x"],
                tiny_pair, REFINERY_UPSCALER_DIR=str(folder))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "big.png").size == (160, 120)  # the model's own factor when --scale is not given
    assert "Postprocess upscaler: tiny-4x" in Image.open(tmp_path / "big.png").info["parameters"]
    listed = _run(["upscale", "--list"], tiny_pair, REFINERY_UPSCALER_DIR=str(folder))
    assert listed.stdout.strip() == "tiny-4x\tESRGAN x4"
    refused = _run(["upscale", str(tmp_path / "in.png"), "-o", str(tmp_path / "x.png"), "--model", "4x-Nope"],
                   tiny_pair, REFINERY_UPSCALER_DIR=str(folder))  # fmt: skip
    assert refused.returncode == 2 and "--model: no upscaler '4x-Nope'" in refused.stderr.replace("\n", "")
    assert not (tmp_path / "x.png").exists()


def test_control_flags_guide_the_base_and_errors_name_the_flag(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.engine.test_controlnet import _tiny_controlnet, edges

    _tiny_controlnet(tiny_pair[0], 1).save_pretrained(tmp_path / "controlnet" / "tiny-canny")
    edges().save(tmp_path / "edges.png")
    environment = {"REFINERY_CONTROLNET_DIR": str(tmp_path / "controlnet")}
    arguments = ["generate", "a tower", "--size", "64x64", "--steps", "4", "--refiner-steps", "2", "--seed", "3"]
    unit = f"tiny-canny:{tmp_path / 'edges.png'}:0.8::2"  # preprocessor left as none, mode 2
    done = _run([*arguments, "-o", str(tmp_path / "a.png"), "--control", unit], tiny_pair, **environment)
    assert done.returncode == 0, done.stderr
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert 'ControlNet 0: "Module: none, Model: tiny-canny, Weight: 0.8' in text
    assert "Control Mode: ControlNet is more important" in text
    again = _run(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "again.png"), "--control",
                  unit], tiny_pair, **environment)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "a.png")))
    asked = _run(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png")], tiny_pair,
                 **environment)  # fmt: skip
    assert asked.returncode == 2 and "give it with --control MODEL:IMAGE" in asked.stderr.replace("\n", "")
    refused = _run([*arguments, "-o", str(tmp_path / "b.png"), "--control", f"nope:{tmp_path / 'edges.png'}"],
                   tiny_pair, **environment)  # fmt: skip
    assert refused.returncode == 2 and "--control #1 (model): no ControlNet 'nope'" in refused.stderr.replace("\n", "")
    assert not (tmp_path / "b.png").exists()


def test_image_prompt_flags_guide_the_base(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.engine.test_image_prompts import write_tiny_ip_adapter

    write_tiny_ip_adapter(tiny_pair[0], tmp_path / "ip", "tiny-ip", 1)
    Image.new("RGB", (40, 40), (200, 40, 40)).save(tmp_path / "ref.png")
    environment = {"REFINERY_IP_ADAPTER_DIR": str(tmp_path / "ip")}
    arguments = ["generate", "a tower", "--size", "64x64", "--steps", "4", "--refiner-steps", "2", "--seed", "3"]
    done = _run([*arguments, "-o", str(tmp_path / "a.png"), "--image-prompt", f"tiny-ip:{tmp_path / 'ref.png'}:0.7"],
                tiny_pair, **environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert 'IP-Adapter 0: "Model: tiny-ip, Weight: 0.7' in Image.open(tmp_path / "a.png").info["parameters"]
    refused = _run([*arguments, "-o", str(tmp_path / "b.png"), "--image-prompt", "tiny-ip"], tiny_pair, **environment)
    assert refused.returncode == 2 and "give MODEL:IMAGE[:WEIGHT]" in refused.stderr.replace("\n", "")
