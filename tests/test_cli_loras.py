"""`refinery generate --lora` and `refinery loras list`, in a subprocess as a user runs them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from sdxl_refinery.png import read_metadata

from .engine.test_loras import UNET_TARGETS, _random_lora
from .test_cli import _run


def _folder(tiny_pair: tuple[Path, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "loras"
    source = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=_random_lora(source.unet, UNET_TARGETS, 9),
                                                weight_name="ink.safetensors")  # fmt: skip
    (folder / "old.safetensors").write_bytes(b"\x00" * 4)
    return folder


def test_lora_by_name_and_by_path_then_from_reproduces(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    folder = _folder(tiny_pair, tmp_path)
    common = ["--size", "64x64", "--steps", "4", "--refiner-steps", "2", "--seed", "5"]
    by_name = _run(["generate", "a kite", *common, "--lora", "ink:0.8", "-o", str(tmp_path / "a.png")], tiny_pair,
                   REFINERY_LORA_DIR=str(folder))  # fmt: skip
    assert by_name.returncode == 0, by_name.stderr
    by_path = _run(["generate", "a kite", *common, "--lora", f"{folder / 'ink.safetensors'}:0.8", "-o",
                    str(tmp_path / "b.png")], tiny_pair)  # fmt: skip
    assert by_path.returncode == 0, by_path.stderr
    again = _run(["generate", "--from", str(tmp_path / "a.png"), "-o", str(tmp_path / "c.png")], tiny_pair,
                 REFINERY_LORA_DIR=str(folder))  # fmt: skip
    assert again.returncode == 0, again.stderr
    pixels = [np.asarray(Image.open(tmp_path / f"{name}.png")) for name in "abc"]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    recorded = read_metadata(tmp_path / "a.png")
    assert 'Lora hashes: "ink: ' in recorded["parameters"]  # quoted, as A1111 quotes values holding ':'
    assert recorded["loras"][0]["weight"] == 0.8 and len(recorded["loras"][0]["hash"]) == 12


def test_a_bad_lora_exits_2_naming_it_and_the_list_shows_the_folder(tiny_pair: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    folder = _folder(tiny_pair, tmp_path)
    done = _run(["generate", "a kite", "--size", "64x64", "--lora", "nope", "-o", str(tmp_path / "x.png")],
                tiny_pair, REFINERY_LORA_DIR=str(folder))  # fmt: skip
    assert done.returncode == 2 and "loras[0] nope: no such LoRA" in done.stderr
    assert not (tmp_path / "x.png").exists()
    listed = _run(["loras", "list"], tiny_pair, REFINERY_LORA_DIR=str(folder))
    assert listed.returncode == 0, listed.stderr
    assert "2 LoRA(s)" in listed.stdout and "old  UNUSABLE: old: not a readable" in listed.stdout
    assert any(line.strip().startswith("ink ") and "unet" in line for line in listed.stdout.splitlines())
