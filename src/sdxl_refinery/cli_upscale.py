"""`refinery upscale`: enlarge images with an upscaler model (ESRGAN and kin) or a resampler, no diffusion."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from .cli_admin import load_settings
from .cli_common import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_FAILURE,
    configure_logging,
    fail,
    parse_size,
    with_progress_and_interrupt,
)
from .cli_errors import check_output
from .errors import Cancelled, InvalidRequest, RefineryError, StorageError
from .input_images import InputImage
from .service import ImageService
from .upscale_request import UpscaleRequest

_FLAGS = {
    "upscaler": "--model",
    "upscaler_2": "--model-2",
    "upscaler_2_visibility": "--model-2-visibility",
    "scale": "--scale",
    "width": "--size",
    "height": "--size",
    "images": "IMAGES",
}


def _scale_of(service: ImageService, model: str) -> float:
    """A model's own factor (a 4x model enlarges 4 times), else A1111's default of 2."""
    entry = next((entry for entry in service.upscaler_entries() if entry.name == model and entry.info), None)
    return float(entry.info.scale) if entry is not None and entry.info is not None else 2.0


def upscale(
    images: Annotated[list[Path] | None, typer.Argument(help="Image files to enlarge (PNG, JPEG, WebP...).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="A .png file, or a folder.")] = Path("outputs"),
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="An upscaler model's name from the upscaler folder (refinery upscale --list), or Lanczos, Nearest.",
        ),
    ] = "Lanczos",
    scale: Annotated[
        float | None,
        typer.Option(
            "--scale", help="Enlarge by this factor, 1..8 (default: the model's own, 2 for Lanczos and Nearest)."
        ),
    ] = None,
    size: Annotated[str | None, typer.Option("--size", help="Enlarge to WIDTHxHEIGHT instead.")] = None,
    stretch: Annotated[
        bool, typer.Option("--stretch", help="With --size: stretch to it rather than crop to its aspect ratio.")
    ] = False,
    model_2: Annotated[str | None, typer.Option("--model-2", help="A second upscaler, blended in.")] = None,
    model_2_visibility: Annotated[
        float, typer.Option("--model-2-visibility", help="The second upscaler's share, 0..1.")
    ] = 0.5,
    upscaler_dir: Annotated[
        Path | None,
        typer.Option(
            "--upscaler-dir", help="The upscaler folder (default REFINERY_UPSCALER_DIR, else <data-dir>/upscalers)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")] = None,
    list_models: Annotated[bool, typer.Option("--list", help="List the upscaler folder and exit.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o FILE.png.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show log lines.")] = False,
) -> None:
    """Enlarge IMAGES with an upscaler model (ESRGAN, Real-ESRGAN, SwinIR, DAT... through spandrel) or Lanczos,
    in tiles, and write PNGs that keep each image's own parameters text."""
    configure_logging(verbose)
    try:
        settings = load_settings(device=device, upscaler_dir=upscaler_dir)
        service = ImageService.from_settings(settings)
        if list_models:
            for entry in service.upscaler_entries():
                what = f"{entry.info.architecture} x{entry.info.scale}" if entry.info else f"unusable: {entry.reason}"
                typer.echo(f"{entry.name}\t{what}")
            return
        if not images:
            raise InvalidRequest("images", "give at least one image file (or --list)")
        check_output(output, overwrite)
        try:
            given = [InputImage.from_path(path) for path in images]
        except ValueError as error:
            raise InvalidRequest("images", str(error)) from None
        width, height = parse_size(size) if size else (0, 0)
        request = UpscaleRequest(
            images=given,
            upscaler=model,
            scale=scale or _scale_of(service, model),
            width=width,
            height=height,
            crop=not stretch,
            upscaler_2=model_2,
            upscaler_2_visibility=model_2_visibility if model_2 else 0.0,
        )
        target = output if output.suffix.lower() == ".png" else output / f"{images[0].stem}-upscaled.png"
        result = asyncio.run(
            with_progress_and_interrupt(
                lambda bar, token: service.upscale(request, output_path=target, on_progress=bar, cancel=token)
            )
        )
    except InvalidRequest as error:
        raise fail(f"{_FLAGS.get(error.field.split('.')[0], error.field)}: {error.rule}", EXIT_BAD_INPUT) from None
    except Cancelled:
        raise fail("cancelled; no image was written", EXIT_CANCELLED) from None
    except (StorageError, RefineryError) as error:
        raise fail(str(error), EXIT_FAILURE) from None
    for path, image in zip(result.paths, result.images, strict=True):
        typer.echo(f"{path}  {image.width}x{image.height}")
    typer.echo(
        f"{len(result.paths)} image(s) upscaled with {model} on {result.device} in {result.timings['total']:.1f}s"
    )
