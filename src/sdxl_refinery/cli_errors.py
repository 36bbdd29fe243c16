"""Command-line errors in the words the user typed: flags instead of API fields, the nearest value that works.

The request's rules name its fields (`scheduler`, `width`), as every API face needs; at the command line the
user typed `--schedule karas` or `--size 500x500`, so the message names that flag, suggests the closest
choice ("did you mean 'Karras'?") and, for a size off the multiple of 8, the nearest size that works.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from .errors import InvalidRequest
from .request import REQUEST_FIELDS

_SIZE_FIELDS = ("width", "height")
# Settings and arguments the request table does not hold, by the name their errors give them.
_OTHER_FLAGS = {"device": "--device", "precision": "--precision", "size": "--size", "prompt": "PROMPT",
                "threads": "--threads", "compile": "--compile"}  # fmt: skip
_OUTPUT_SUFFIXES = {".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif"}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("++", "pp"))


def closest_choice(value: str, choices: list[str]) -> str | None:
    """The choice `value` most likely meant (case, spaces, `++` and `_` aside), or None when none is close."""
    by_key = {_key(choice): choice for choice in choices}
    close = difflib.get_close_matches(_key(value), list(by_key), n=1, cutoff=0.6)
    return by_key[close[0]] if close else None


def flag_message(error: InvalidRequest, given: dict[str, Any]) -> str:
    """`error` worded for the command line: the flag that set the field, and a suggestion when one helps.

    Args:
        error: a request rule broken, naming its field.
        given: the request fields as the user set them (flags and `--from`), before validation.
    """
    spec = next((spec for spec in REQUEST_FIELDS if spec.name == error.field), None)
    flag = spec.faces.cli if spec is not None and spec.faces.cli else _OTHER_FLAGS.get(error.field, error.field)
    for prefix, option in (("controlnets.", "--control"), ("image_prompts.", "--image-prompt")):
        if error.field.startswith(prefix):  # controlnets.N.FIELD: the N-th --control
            number, _, part = error.field.removeprefix(prefix).partition(".")
            flag = f"{option} #{int(number) + 1}" + (f" ({part})" if part else "")
    value = given.get(error.field)
    hint = ""
    if error.field in _SIZE_FIELDS and "size_flag" in given:
        flag, value = "--size", given["size_flag"]
        width, height = (given.get(side) for side in _SIZE_FIELDS)
        if isinstance(width, int) and isinstance(height, int) and (width % 8 or height % 8):
            hint = f"; the nearest size that works is {_multiple_of_8(width)}x{_multiple_of_8(height)}"
    elif spec is not None and spec.choices and isinstance(value, str):
        guess = closest_choice(value, spec.choices)
        if guess is not None and guess != value:  # a valid name refused for another reason is no typo
            hint = f"; did you mean {guess!r}?"
    if value is None or not isinstance(value, str | int | float | Path):  # images, LoRA lists: the rule says
        return f"{flag}: {error.rule}{hint}"
    return f"{flag} {str(value) if isinstance(value, Path) else value!r}: {error.rule}{hint}"


def _multiple_of_8(size: int) -> int:
    return max(64, round(size / 8) * 8)


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an output path that would not hold what the user expects, before any work.

    Raises:
        InvalidRequest: naming `-o/--output`: another image format (Refinery writes PNG: the recipe lives in its
            metadata), or an existing PNG without `--overwrite`.
    """
    suffix = output.suffix.lower()
    if suffix in _OUTPUT_SUFFIXES and not output.is_dir():
        raise InvalidRequest("-o/--output", f"{str(output)!r}: images are written as PNG (their recipe lives in the "
                                            f"PNG's metadata); give a .png file name or a folder")  # fmt: skip
    if suffix == ".png" and output.exists() and not overwrite:
        raise InvalidRequest("-o/--output", f"{str(output)!r} exists; add --overwrite to replace it, or name "
                                            "another file or a folder")  # fmt: skip
