"""Upscaler models: spandrel's models run by tiles, read without running pickled code, judged file by file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdxl_refinery.engine.upscaler_models import load_upscaler, tile_count, upscale_tiled
from sdxl_refinery.engine.upscaling import Upscalers
from sdxl_refinery.errors import Cancelled, InvalidRequest
from sdxl_refinery.results import CancelToken
from tests.upscaler_files import tiny_esrgan, write_hostile_pth, write_tiny_esrgan


def noise_image(width: int, height: int, seed: int = 1) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def by_hand(model: torch.nn.Module, image: Image.Image) -> np.ndarray:
    """The model run on the whole image as spandrel's README shows: (1, 3, H, W) in [0, 1]."""
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        out = model(tensor).clamp(0, 1)
    return (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("upscalers")
    write_tiny_esrgan(root / "tiny-4x.safetensors", scale=4)
    write_tiny_esrgan(root / "sub" / "tiny-2x.pth", scale=2, seed=3)
    save_file({"lora_unet_down.lora_down.weight": torch.zeros(4, 8)}, str(root / "a-lora.safetensors"))
    (root / "garbage.pth").write_bytes(b"not a checkpoint at all")
    return root


def test_the_upscale_equals_spandrels_model_run_by_hand(folder: Path) -> None:
    image = noise_image(40, 30)
    upscaled = Upscalers(folder, "cpu").enlarge(image, "tiny-4x", (160, 120))
    expected = by_hand(tiny_esrgan(4), image)
    assert upscaled.size == (160, 120)
    assert np.abs(np.asarray(upscaled).astype(np.int16) - expected).max() <= 1  # within 1/255


def test_tiles_give_what_the_whole_image_gives_within_one_level(folder: Path) -> None:
    model = load_upscaler(folder / "tiny-4x.safetensors")
    image = noise_image(150, 110, seed=2)
    assert tile_count(150, 110, tile=80, margin=24) == 20  # cores of 32 px: many seams
    done: list[tuple[int, int]] = []
    tiled = upscale_tiled(model, image, torch.device("cpu"), torch.float32, lambda d, n: done.append((d, n)),
                          tile=80, margin=24)  # fmt: skip
    whole = by_hand(model.model, image)
    assert tiled.size == (600, 440) and done[-1] == (20, 20)
    assert np.abs(np.asarray(tiled).astype(np.int16) - whole).max() <= 1


def test_a_cancelled_token_stops_before_the_next_tile(folder: Path) -> None:
    model = load_upscaler(folder / "tiny-4x.safetensors")
    token = CancelToken()
    seen: list[int] = []

    def tile_done(done: int, _all: int) -> None:
        seen.append(done)
        token.cancel()

    with pytest.raises(Cancelled):
        upscale_tiled(model, noise_image(150, 110), torch.device("cpu"), torch.float32, tile_done, token, 64, 24)
    assert seen == [1]


def test_the_folder_is_judged_file_by_file(folder: Path) -> None:
    entries = {entry.name: entry for entry in Upscalers(folder, "cpu").entries()}
    assert entries["tiny-4x"].info is not None and entries["tiny-4x"].info.scale == 4
    assert entries["tiny-4x"].info.architecture == "ESRGAN"
    assert entries["sub/tiny-2x"].info is not None and entries["sub/tiny-2x"].info.scale == 2  # a .pth, weights only
    assert "not a model architecture spandrel knows" in str(entries["a-lora"].reason)
    assert "not readable as weights only" in str(entries["garbage"].reason)


def test_a_pth_holding_code_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write_hostile_pth(tmp_path / "hostile.pth", marker)
    (entry,) = Upscalers(tmp_path, "cpu").entries()
    assert entry.info is None and "not readable as weights only" in str(entry.reason)
    assert not marker.exists()  # the pickled call never ran
    with pytest.raises(InvalidRequest, match="upscaler 'hostile' cannot be used"):
        Upscalers(tmp_path, "cpu").check("hostile", "upscaler")


def test_unknown_names_are_refused_naming_what_is_known(folder: Path) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Upscalers(folder, "cpu").check("4x-UltraSharp", "hr_upscaler")
    assert caught.value.field == "hr_upscaler"
    assert "Lanczos" in caught.value.rule and "tiny-4x" in caught.value.rule and "a-lora" not in caught.value.rule


def test_a_model_runs_again_until_the_size_is_covered_then_lanczos_gives_the_exact_size(folder: Path) -> None:
    upscalers = Upscalers(folder, "cpu")
    image = noise_image(20, 20)
    assert upscalers.tiles("sub/tiny-2x", 20, 20, (70, 70)) == 2  # 20 -> 40 -> 80, then down to 70
    counted: list[int] = []
    out = upscalers.enlarge(image, "sub/tiny-2x", (70, 70), on_tile=lambda: counted.append(1))
    assert out.size == (70, 70) and len(counted) == 2
    assert upscalers.enlarge(image, "Nearest", (60, 60)).getpixel((0, 0)) == image.getpixel((0, 0))
