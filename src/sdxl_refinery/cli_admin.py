"""`refinery doctor`, `refinery models pull|list|verify` and `refinery export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import admin
from .cli_errors import flag_message
from .config import Settings
from .errors import InvalidRequest, ModelLoadError, RefineryError

models_app = typer.Typer(help="Download, list and check models.", no_args_is_help=True)
loras_app = typer.Typer(help="The LoRA folder (REFINERY_LORA_DIR, default <data-dir>/loras).", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def load_settings(**flags: Any) -> Settings:
    """Settings from the environment with the given flags on top; a bad value exits 2 naming it."""
    from pydantic import ValidationError

    try:
        return Settings(**{key: value for key, value in flags.items() if value is not None})
    except ValidationError as error:
        first = error.errors()[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidRequest):  # our own rule: worded with the flag that set it
            raise _fail(flag_message(cause, flags), 2) from None
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise _fail(f"{field}: {first['msg'].removeprefix('Value error, ')}", 2) from None


def _gib(value: int | None) -> str:
    if value is None:
        return "unknown"
    return f"{value / 2**30:.1f} GiB" if value >= 2**27 else f"{value / 2**20:.1f} MiB"


def doctor(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Device, precision and why, memory against what the configured models need, models present, offline readiness."""
    try:
        report = admin.doctor_report(load_settings())
    except InvalidRequest as error:
        raise _fail(str(error), 2) from None
    except ModelLoadError as error:
        raise _fail(str(error), 1) from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    fits = {True: "[green]fits[/]", False: "[red]does not fit[/]", None: "unknown"}[report["fits"]]
    out.print(f"Device:     {report['device']}")
    out.print(f"Precision:  {report['precision']}  ({report['why']})")
    params = sum(report["parameters"].values())
    count = f"{params / 1e9:.2f} B" if params >= 1e8 else f"{params / 1e6:.2f} M"
    out.print(f"Weights:    {count} parameters (base + refiner UNet, shared encoder 2 and VAE) "
              f"= {_gib(report['weights_bytes_needed'])} in {report['precision'].split('+')[0]}")  # fmt: skip
    out.print(f"            from {report['parameters_from']}")
    out.print(f"Memory:     {report['memory_label']} {_gib(report['memory_available_bytes'])}: {fits}")
    if report["memory_plan"]:
        out.print(f"Plan:       {report['memory_plan']}")
    out.print(f"Speed:      {', '.join(report['speed_plan']) or 'plain eager models'}")
    for role, reference in report["models"].items():
        state = "[green]present[/]" if report["models_present"][role] else "[yellow]not downloaded[/]"
        out.print(f"{role.capitalize():<11} {reference}  {state}")
    out.print(f"Folder:     {report['models_folder']} ({len(report['folder_models'])} files)")
    for row in report["folder_models"]:
        out.print(f"            {row['reference']}: {row['role']} ({row['local']})", markup=False)
    ready = "[green]yes[/]" if report["offline_ready"] else "[yellow]no[/] (run `refinery models pull`)"
    out.print(f"Offline:    HF_HUB_OFFLINE={'on' if report['offline'] else 'off'}; ready to run offline: {ready}")


@models_app.command("pull")
def pull(fp16: Annotated[bool, typer.Option("--fp16", help="Fetch the fp16 weight files (for GPUs).")] = False) -> None:
    """Download the configured base and refiner into the Hugging Face cache (resumable)."""
    try:
        for folder in admin.pull_models(Settings(), fp16):
            typer.echo(folder)
    except RefineryError as error:
        raise _fail(str(error), 1) from None


@models_app.command("list")
def list_models() -> None:
    """The configured pair, the models folder (what each file is) and the SDXL models in the Hugging Face cache."""
    table = Table("role", "reference", "local")
    for row in admin.list_models(Settings()):
        table.add_row(row["role"], row["reference"], row["local"])
    out.print(table)


@models_app.command("verify")
def verify(path: Annotated[Path, typer.Argument(help="A .safetensors file or diffusers folder.")]) -> None:
    """Kind, A1111 model hash and a check that every component tensor is there with its shape."""
    try:
        result = admin.verify_model(path)
    except RefineryError as error:
        raise _fail(str(error), 1) from None
    typer.echo(f"{result.path}\nkind: {result.kind}\nhash: {result.hash}")
    for problem in result.problems:
        typer.echo(f"problem: {problem}")
    typer.echo("components: complete" if result.ok else "components: INCOMPLETE")
    if not result.ok:
        raise typer.Exit(1)


def export(
    source: Annotated[Path, typer.Argument(help="A diffusers folder, or a single .safetensors file.")],
    target: Annotated[Path, typer.Argument(help="The single file, or the diffusers folder, to write.")],
) -> None:
    """Convert between a diffusers folder and one SGM-layout .safetensors file (either way)."""
    try:
        typer.echo(f"wrote {admin.export_model(source, target)}")
    except RefineryError as error:
        raise _fail(str(error), 1) from None


@loras_app.command("list")
def loras_list(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Data folder (REFINERY_DATA_DIR).")] = None,
) -> None:
    """Every LoRA in the folder: the name to use, A1111's hash, what it changes; bad files with the reason."""
    from .loras import LoraFolder, check_file

    folder = LoraFolder(load_settings(data_dir=data_dir).loras_folder())
    names = folder.names()
    typer.echo(f"{len(names)} LoRA(s) in {folder.folder}")
    for name in names:
        try:
            lora = check_file(name, folder.path_of(name, allow_paths=False), context_width=None)
        except InvalidRequest as error:
            typer.echo(f"  {name}  UNUSABLE: {error.rule}")
            continue
        typer.echo(f"  {name}  {lora.short_hash}  {', '.join(lora.parts)}")
