"""The `generate` command's request options, generated from the request's field table: one flag per field,
its help in the command line's words (flags, not API names), grouped into help panels by what it controls."""

from __future__ import annotations

import inspect
import re
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from .fields import FieldSpec
from .request import REQUEST_FIELDS


def in_flags(text: str) -> str:
    """A field description in the command line's words: each field it names as the flag that sets it."""
    flags = {spec.name: spec.faces.cli.split("/")[0] for spec in REQUEST_FIELDS if spec.faces.cli}
    text = text.replace("hr_resize_x/y", "--hires-width/--hires-height")
    return re.sub(r"\b[a-z][a-z_]*_[a-z_]+\b", lambda match: flags.get(match.group(0), match.group(0)), text)


def option_help(spec: FieldSpec) -> str:
    """A generated option's help: the field's description, default and rule, from the request table."""
    default = spec.default.value if isinstance(spec.default, Enum) else spec.default
    parts = [in_flags(spec.description)]
    if spec.choices:
        other = ", or an upscaler model's name (refinery upscale --list)" if spec.open_choices else ""
        parts.append(f"One of {', '.join(spec.choices)}{other}.")
    if spec.bounds_text():
        parts.append(f"Range {spec.bounds_text()}.")
    if default not in (None, "") and spec.kind is not bool:
        parts.append(f"Default {default}.")
    return " ".join(parts)


_REFINER_FIELDS = {"mode", "switch_at", "use_refinement", "aesthetic_score", "negative_aesthetic_score"}
_IMAGE_FIELDS = {"init_image", "strength", "resize_mode", "inpainting_fill"}


def panel(name: str) -> str:
    """Which `--help` panel a request field's option sits in: what it controls."""
    if name.startswith("refiner_") or name in _REFINER_FIELDS:
        return "Refiner"
    if name in _IMAGE_FIELDS or name.startswith(("mask", "inpaint")):
        return "From an image (img2img, inpainting)"
    if name.startswith("hr_") or name == "enable_hr":
        return "Hires fix"
    return "Sampling"


def request_parameters() -> list[inspect.Parameter]:
    """One typer option per request field that has a CLI name: the same table every face reads."""
    parameters = []
    for spec in REQUEST_FIELDS:
        if spec.faces.cli is None:
            continue
        kind: type = str if spec.choices else spec.kind  # enums are checked by the request, naming the field
        if kind not in (str, int, float, bool):  # an image field: a file on this machine
            kind = Path
        names = [spec.faces.cli, *([spec.faces.cli_short] if spec.faces.cli_short else [])]
        option = typer.Option(*names, help=option_help(spec), show_default=False, rich_help_panel=panel(spec.name))
        annotation = Annotated[kind | None, option]  # type: ignore[valid-type]
        parameters.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=annotation))  # fmt: skip
    return parameters


def with_request_options(command: Any) -> Any:
    """`command`'s signature with the request table's options added (typer reads the signature)."""
    hints = typing.get_type_hints(command, include_extras=True)  # resolved: this module defers annotations
    own = [parameter.replace(annotation=hints[parameter.name]) for parameter in inspect.signature(command).parameters
           .values() if parameter.kind is not inspect.Parameter.VAR_KEYWORD]  # fmt: skip
    parameters = own[:1] + request_parameters() + own[1:]
    command.__signature__ = inspect.Signature(parameters)
    command.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return command
