"""The `refinery` command line: generate, info, doctor (and later serve, worker, models, export).

A face: it parses flags into `Settings` and a `GenerationRequest`, talks to
`ImageService`, and maps errors to exit codes: 0 success, 1 failure,
2 bad input (the message names the field), 130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
import traceback
import unicodedata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from . import admin
from .cli_admin import doctor, export, load_settings, loras_app, models_app
from .cli_common import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILURE, console, with_progress_and_interrupt
from .cli_common import configure_logging as _configure_logging
from .cli_common import fail as _fail
from .cli_common import parse_size as _parse_size
from .cli_errors import check_output, flag_message
from .cli_options import with_request_options
from .cli_upscale import upscale
from .errors import Cancelled, InvalidRequest, RefineryError, StorageError
from .input_images import InputImage
from .png import read_metadata
from .request import MAX_SEED, GenerationRequest
from .service import ImageService

app = typer.Typer(help="Refinery: SDXL base + refiner, every image, CPU and GPU.", no_args_is_help=True)


def _print_cause(error: BaseException) -> None:
    """The stack trace of what caused `error` (`-v`): the library's own frames, where the fault is."""
    cause = error.__cause__
    console.print("".join(traceback.format_exception(cause)) if cause is not None else repr(error), markup=False,
                  highlight=False)  # fmt: skip


def _printable(text: str) -> str:
    """`text` with control characters other than newline and tab shown as escapes (`\\x1b`), never sent raw."""
    return "".join(char if char in "\n\t" or unicodedata.category(char) != "Cc" else repr(char)[1:-1]
                   for char in text)  # fmt: skip


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "image"


def _output_file(output: Path, pattern: str, prompt: str, seed: int) -> Path:
    """A `.png` path is used as it is; anything else is a folder filled by `pattern`."""
    if output.suffix.lower() == ".png":
        return output
    name = pattern.format(seed=seed, prompt=_slug(prompt), timestamp=time.strftime("%Y%m%d-%H%M%S"))
    return output / (name if name.lower().endswith(".png") else f"{name}.png")


def _request_fields(source: Path | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request fields and recorded run settings: the PNG's metadata first, given options on top."""
    fields: dict[str, Any] = {}
    recorded: dict[str, Any] = {}
    if source is not None:
        metadata = read_metadata(source)
        fields = dict(metadata["request"])
        fields["seed"] = metadata["seeds"][metadata.get("index", 0)]
        fields["n"] = 1
        recorded = {
            "precision": metadata.get("precision_policy"),
            "device": metadata.get("device"),
            "base": metadata.get("models", {}).get("base_source", "").partition(":")[2] or None,
            "refiner": metadata.get("models", {}).get("refiner_source", "").partition(":")[2] or None,
        }
    given = {key: value for key, value in options.items() if value is not None}
    for name, flag in (("init_image", "--init-image"), ("mask_image", "--mask")):
        if isinstance(fields.get(name), dict):  # the PNG records the image's hash; the image must be at hand
            given[name] = _recorded_image(name, flag, fields[name], given.get(name))
    fields.update(given)
    return fields, recorded


def _recorded_image(name: str, flag: str, summary: dict[str, Any], path: Path | None) -> Path:
    """The file for an image a PNG's recipe names by hash: the one given, else asked for on a terminal.

    Raises:
        InvalidRequest: no file given and no terminal to ask on.
    """
    wanted = InputImage.reference(summary)
    described = f"{wanted.width}x{wanted.height}, sha256 {wanted.short_hash}"
    if path is None:
        if not sys.stdin.isatty():
            raise InvalidRequest(name, f"the PNG was made from an image ({described}); give it with {flag}")
        path = Path(typer.prompt(f"The PNG was made from an image ({described}). Its file"))
    try:
        image = InputImage.from_path(path)
    except ValueError as error:
        raise InvalidRequest(name, str(error)) from None
    if not wanted.matches(image):
        console.print(f"[yellow]{path} is not the recorded image ({described}): the result will differ[/yellow]")
    return path


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"refinery {version('sdxl-refinery')}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Refinery: SDXL base + refiner, every image, CPU and GPU."""
    _configure_logging(verbose=False)


_DEVICE, _MODELS, _OUTPUT = "Device", "Models and LoRAs", "Output"


def _generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    *,
    size: Annotated[
        str | None, typer.Option("--size", help="WIDTHxHEIGHT, e.g. 1024x1024 (sets both).", rich_help_panel="Sampling")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="auto, cpu, mps, cuda or cuda:N.", rich_help_panel=_DEVICE)
    ] = None,
    precision: Annotated[
        str | None, typer.Option("--precision", help="auto, full, half or bf16.", rich_help_panel=_DEVICE)
    ] = None,
    compile_models: Annotated[
        str | None,
        typer.Option(
            "--compile", help="torch.compile the UNets: auto (CUDA only), on or off.", rich_help_panel=_DEVICE
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads (0: one per usable CPU).", rich_help_panel=_DEVICE)
    ] = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base", help="Base model: Hub id, diffusers folder, .safetensors file or tiny.", rich_help_panel=_MODELS
        ),
    ] = None,
    refiner: Annotated[
        str | None,
        typer.Option(
            "--refiner", help="Refiner model: Hub id, diffusers folder, .safetensors or tiny.", rich_help_panel=_MODELS
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="A .png file, or a folder.", rich_help_panel=_OUTPUT)
    ] = Path("outputs"),
    pattern: Annotated[
        str, typer.Option("--name", help="File name in a folder: {seed} {prompt} {timestamp}.", rich_help_panel=_OUTPUT)
    ] = ("{timestamp}-{seed}-{prompt}"),
    from_png: Annotated[
        Path | None, typer.Option("--from", help="Reproduce this PNG from its metadata.", rich_help_panel=_OUTPUT)
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            help="A LoRA: NAME[:WEIGHT], a name from the LoRA folder or a .safetensors path; "
            "repeatable. Weight -5..5, default 1.",
            rich_help_panel=_MODELS,
        ),
    ] = None,
    control: Annotated[
        list[str] | None,
        typer.Option(
            "--control",
            help="A ControlNet unit: MODEL:IMAGE[:WEIGHT[:PREPROCESSOR[:MODE]]], a name from the ControlNet folder, "
            "a control image file, weight 0..2 (default 1), preprocessor none, canny, invert, depth_midas, "
            "depth_anything, depth_anything_v2, depth_zoe or openpose (default none; the model ones need the "
            "annotator folder), control mode 0 Balanced (default), 1 prompt more important, 2 ControlNet more "
            "important; repeatable.",
            rich_help_panel=_MODELS,
        ),
    ] = None,
    image_prompt: Annotated[
        list[str] | None,
        typer.Option(
            "--image-prompt",
            help="An image prompt: MODEL:IMAGE[:WEIGHT], an IP-Adapter from the IP-Adapter folder, a reference image "
            "file, weight 0..2 (default 1); repeatable.",
            rich_help_panel=_MODELS,
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the stage log lines.", rich_help_panel=_OUTPUT)
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing -o FILE.png.", rich_help_panel=_OUTPUT)
    ] = False,
    **request_options: Any,
) -> None:
    """Render PROMPT with the SDXL base and then the refiner, and write PNGs with their recipe."""
    _configure_logging(verbose)
    given: dict[str, Any] = {}  # the fields as typed, for errors worded in flags
    try:
        # 1. The request: the PNG's recipe (--from), then the given options, through one table.
        check_output(output, overwrite)
        options = {"prompt": prompt, **request_options}
        if size:
            options["width"], options["height"] = _parse_size(size)
            given["size_flag"] = size
        fields, recorded = _request_fields(from_png, options)
        given.update(fields)
        if lora:
            fields["loras"] = [*fields.get("loras", []), *map(_parse_lora, lora)]
        if image_prompt:  # given image prompts replace the ones a --from PNG recorded
            fields["image_prompts"] = [_parse_image_prompt(text) for text in image_prompt]
        elif fields.get("image_prompts"):  # recorded by hash: each reference image must be at hand
            fields["image_prompts"] = [
                {**prompt, "image": _recorded_image(f"image_prompts.{index}.image", "--image-prompt MODEL:IMAGE",
                                                    prompt["image"], None)} if isinstance(prompt.get("image"), dict)
                else prompt for index, prompt in enumerate(fields["image_prompts"])
            ]  # fmt: skip
        if control:  # given units replace the ones a --from PNG recorded
            fields["controlnets"] = [_parse_control(text) for text in control]
        elif fields.get("controlnets"):  # recorded by hash: each unit's image must be at hand
            fields["controlnets"] = [
                {**unit, "image": _recorded_image(f"controlnets.{index}.image", "--control MODEL:IMAGE", unit["image"],
                                                  None)} if isinstance(unit.get("image"), dict) else unit
                for index, unit in enumerate(fields["controlnets"])
            ]  # fmt: skip
        if "prompt" not in fields:
            raise InvalidRequest("prompt", "is required (or give --from image.png)")
        if fields.get("seed") is None:
            fields["seed"] = secrets.randbelow(MAX_SEED + 1)
        request = GenerationRequest(**fields)
        # 2. The service: flags, then what the PNG recorded, then the environment.
        settings = load_settings(
            base_model=base or recorded.get("base"), refiner_model=refiner or recorded.get("refiner"),
            device=device or (recorded.get("device") if recorded.get("device") == "cpu" else None),
            precision=precision or recorded.get("precision"), compile=compile_models, threads=threads,
        )  # fmt: skip
        admin.check_models(settings.base_model, settings.refiner_model)  # a bad path fails now, not after loading
        if (notice := admin.download_notice(settings.base_model, settings.refiner_model)) is not None:
            console.print(notice)
        service = ImageService.from_settings(settings)
        # 3. The run, with progress bars and Ctrl-C as cancel.
        target = _output_file(output, pattern, request.prompt, request.seed or 0)
        result = asyncio.run(
            with_progress_and_interrupt(
                lambda bar, token: service.generate(request, output_path=target, on_progress=bar, cancel=token)
            )
        )
    except InvalidRequest as error:
        raise _fail(flag_message(error, given), EXIT_BAD_INPUT) from None
    except Cancelled:
        raise _fail("cancelled; no image was written", EXIT_CANCELLED) from None
    except StorageError as error:
        raise _fail(str(error), EXIT_BAD_INPUT if from_png and not from_png.exists() else EXIT_FAILURE) from None
    except RefineryError as error:
        if verbose:  # the cause's stack trace, for a report
            _print_cause(error)
        raise _fail(str(error), EXIT_FAILURE) from None
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    refined = "refined" if result.refined else f"NOT refined ({result.refinement_error or 'disabled'})"
    for path, image_seed in zip(result.paths, result.seeds, strict=True):
        typer.echo(f"{path}  seed={image_seed}")
    typer.echo(f"{len(result.paths)} image(s), {refined}, {result.device} {result.precision}; {timings}")


def _parse_control(text: str) -> dict[str, Any]:
    """`MODEL:IMAGE[:WEIGHT[:PREPROCESSOR[:MODE]]]` as a ControlNet unit of the request (its rules are the
    request's)."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 5 or not parts[0] or not parts[1]:
        raise InvalidRequest("controlnets", f"--control {text}: give MODEL:IMAGE[:WEIGHT[:PREPROCESSOR[:MODE]]]")
    unit: dict[str, Any] = {"model": parts[0], "image": Path(parts[1])}
    if len(parts) > 2 and parts[2]:
        try:
            unit["weight"] = float(parts[2])
        except ValueError:
            raise InvalidRequest("controlnets", f"--control {text}: the weight must be a number") from None
    if len(parts) > 3 and parts[3]:
        unit["preprocessor"] = parts[3]
    if len(parts) > 4 and parts[4]:
        unit["control_mode"] = parts[4]
    return unit


def _parse_image_prompt(text: str) -> dict[str, Any]:
    """`MODEL:IMAGE[:WEIGHT]` as an image prompt of the request (its rules are the request's)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise InvalidRequest("image_prompts", f"--image-prompt {text}: give MODEL:IMAGE[:WEIGHT]")
    prompt: dict[str, Any] = {"model": parts[0], "image": Path(parts[1])}
    if len(parts) == 3 and parts[2]:
        try:
            prompt["weight"] = float(parts[2])
        except ValueError:
            raise InvalidRequest("image_prompts", f"--image-prompt {text}: the weight must be a number") from None
    return prompt


def _parse_lora(text: str) -> dict[str, Any]:
    """`NAME[:WEIGHT]` as a LoRA of the request (the weight's rules are the request's)."""
    name, sep, weight = text.rpartition(":")
    if not sep or not name:
        return {"name": text, "weight": 1.0}
    try:
        return {"name": name, "weight": float(weight)}
    except ValueError:
        raise InvalidRequest("loras", f"--lora {text}: the weight after ':' must be a number") from None


app.command("generate")(with_request_options(_generate))


@app.command()
def info(image: Annotated[Path, typer.Argument(help="A PNG written by Refinery.")]) -> None:
    """Print an image's recipe: the A1111 parameters and the full metadata."""
    import json

    try:
        metadata = read_metadata(image)
    except StorageError as error:
        raise _fail(str(error), EXIT_BAD_INPUT) from None
    parameters = metadata.pop("parameters", None)
    if parameters:
        typer.echo(_printable(parameters))  # a PNG from elsewhere may carry terminal escape sequences
        typer.echo("")
    typer.echo(json.dumps(metadata, indent=2, sort_keys=True))  # JSON escapes control characters itself


@app.command()
def serve(
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (REFINERY_HOST).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (REFINERY_PORT).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Jobs and images (REFINERY_DATA_DIR).")] = None,
    backend: Annotated[str | None, typer.Option("--backend", help="embedded (SQLite) or celery.")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis for the celery backend.")] = None,
) -> None:
    """Serve the native, OpenAI and A1111 APIs and the web page, with a durable job queue."""
    import uvicorn

    from .server import create_app
    from .server.connections import http_protocol

    settings = load_settings(host=host, port=port, data_dir=data_dir, backend=backend, redis_url=redis_url)
    try:
        application = create_app(settings)
    except RefineryError as error:
        raise _fail(str(error), EXIT_FAILURE) from None
    console.print(f"Refinery serving on http://{settings.host}:{settings.port} (data in {settings.data_dir})")
    uvicorn.run(application, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30,
                http=http_protocol(settings.client_timeout_seconds))  # fmt: skip


@app.command()
def worker(
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis broker (REFINERY_REDIS_URL).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Shared image folder (REFINERY_DATA_DIR).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Worker name, unique among live workers (default: host-device-pid).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Device this worker owns: cpu, cuda, cuda:1, mps (REFINERY_DEVICE).")
    ] = None,
) -> None:
    """Run jobs from the Celery queue on one device: one process per device (`--device cuda:0`, `cuda:1`, ...)."""
    import socket

    from .jobs.celery_worker import run_worker

    settings = load_settings(redis_url=redis_url, data_dir=data_dir, device=device)
    try:
        run_worker(settings, name or f"{socket.gethostname()}-{settings.device.replace(':', '')}-{os.getpid()}")
    except RefineryError as error:
        raise _fail(str(error), EXIT_FAILURE) from None


@app.command()
def status(
    url: Annotated[str, typer.Option("--url", help="A Refinery server.")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="REFINERY_API_KEY")] = None,
) -> None:
    """Workers, their devices, what each runs, and the queue depth, as a server sees them."""
    import httpx
    from rich.table import Table

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        answer = httpx.get(f"{url.rstrip('/')}/v1/workers", headers=headers, timeout=10)
        answer.raise_for_status()
    except httpx.HTTPError as error:
        raise _fail(f"{url}: {error}", EXIT_FAILURE) from None
    report = answer.json()
    table = Table("worker", "host", "device", "precision", "loaded", "running")
    for row in report["workers"]:
        table.add_row(row["name"], row.get("host") or "", str(row["device"]), str(row["precision"]),
                      "yes" if row["loaded"] else "no", row["current_job"] or "-")  # fmt: skip
    Console().print(table)
    counts = ", ".join(f"{key} {value}" for key, value in report["counts"].items())
    typer.echo(f"backend {report['backend']}; queue depth {report['queue_depth']} ({counts})")


app.add_typer(models_app, name="models")
app.add_typer(loras_app, name="loras")
app.command()(upscale)
app.command()(doctor)
app.command()(export)


def main() -> None:
    app()
