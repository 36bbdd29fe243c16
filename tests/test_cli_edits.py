"""`refinery generate --init-image/--mask/--hires-scale`, and `--from` on an image that started from a file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdxl_refinery.png import read_metadata

from .test_cli import _run


def _files(tmp_path: Path) -> tuple[Path, Path]:
    start = Image.new("RGB", (72, 64), (40, 90, 160))
    ImageDraw.Draw(start).rectangle((20, 20, 50, 44), fill=(230, 210, 30))
    mask = Image.new("L", (72, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 30, 63), fill=255)
    start.save(tmp_path / "start.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path / "start.png", tmp_path / "mask.png"


def test_inpainting_from_files_and_from_reproduces_with_the_image(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    start, mask = _files(tmp_path)
    first = tmp_path / "a.png"
    made = _run(["generate", "a yellow box", "--init-image", str(start), "--mask", str(mask), "--strength", "0.5",
                 "--mask-blur", "0", "--steps", "4", "--refiner-steps", "2", "-o", str(first)], tiny_pair)  # fmt: skip
    assert made.returncode == 0, made.stderr
    image = Image.open(first)
    assert image.size == (72, 64)  # the init image's own size
    assert np.array_equal(np.asarray(image.convert("RGB"))[:, 40:], np.asarray(Image.open(start))[:, 40:])
    metadata = read_metadata(first)
    assert metadata["request"]["init_image"]["width"] == 72 and "Mask blur: 0" in metadata["parameters"]
    assert "Denoising strength: 0.5" in metadata["parameters"]

    # --from without the image: no terminal to ask on, so it says which image and which flag.
    missing = _run(["generate", "--from", str(first), "-o", str(tmp_path / "b.png")], tiny_pair)
    assert missing.returncode == 2 and "--init-image" in missing.stderr and "72x64" in missing.stderr
    again = tmp_path / "c.png"
    done = _run(["generate", "--from", str(first), "--init-image", str(start), "--mask", str(mask), "-o", str(again)],
                tiny_pair)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_hires_scale_and_bad_files_exit_2(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "h.png"
    done = _run(["generate", "a hill", "--size", "64x64", "--hires", "--hires-scale", "1.5", "--steps", "3",
                 "--refiner-steps", "1", "-o", str(out)], tiny_pair)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (96, 96) and "Hires upscale: 1.5" in read_metadata(out)["parameters"]
    (tmp_path / "text.png").write_text("not an image")
    bad = _run(["generate", "x", "--init-image", str(tmp_path / "text.png"), "-o", str(tmp_path)], tiny_pair)
    assert bad.returncode == 2 and "--init-image" in bad.stderr and "readable image" in bad.stderr
    bad = _run(["generate", "x", "--init-image", str(tmp_path / "none.png"), "-o", str(tmp_path)], tiny_pair)
    assert bad.returncode == 2 and "no image file" in bad.stderr
