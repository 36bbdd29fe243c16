"""The field table: how each face names a request field, read from the request model itself.

A request field is declared once, in `GenerationRequest`, as
`name: Annotated[type, Faces(...)] = Field(default, bounds..., description=...)`.
`field_table()` turns those declarations into `FieldSpec`s, from which the
command line builds its options, the A1111 adapter its request model, the PNG
writer its `parameters` text and the server its `/v1/schema` for the web page.
Nothing here knows any particular field.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any

from annotated_types import Ge, Gt, Le, Lt, MultipleOf
from pydantic import BaseModel
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class Faces:
    """How the faces name one request field; None means the face does not offer it.

    Attributes:
        cli: the command line flag, e.g. `--steps` (a bool gets `--flag/--no-flag`).
        cli_short: an optional one-letter alias, e.g. `-n`.
        a1111: the field's name in A1111's txt2img API.
        a1111_option: the A1111 option (settings key) that also sets it, e.g. `CLIP_stop_at_last_layers`:
            read from the options clients store (`POST /sdapi/v1/options`) and from a request's
            `override_settings`; the body field, when sent, wins.
        label: its label in A1111's PNG `parameters` text (fields sharing a label are joined by `x`).
        web: whether the web page offers it.
        choices_from: for a text field that also takes other names (an upscaler model), the enum of its
            built-in choices, offered by the faces.
    """

    cli: str | None = None
    cli_short: str | None = None
    a1111: str | None = None
    a1111_option: str | None = None
    label: str | None = None
    web: bool = True
    choices_from: type[Enum] | None = None


@dataclass(frozen=True)
class FieldSpec:
    """One request field as every face sees it.

    Attributes:
        name: the field's name in the library, the native API and the queue payload.
        kind: the plain type (`int`, `float`, `str`, `bool` or an `Enum` class).
        optional: whether None is allowed (e.g. a random seed).
        default: the default value (None when required or optional-without-default).
        required: whether the field must be given.
        description: one line for help texts and forms.
        faces: how each face names it.
        minimum, maximum: inclusive bounds, when the field has them.
        exclusive_minimum, exclusive_maximum: exclusive bounds, when the field has them.
        multiple_of: a step the value must be a multiple of.
    """

    name: str
    kind: type
    optional: bool
    default: Any
    required: bool
    description: str
    faces: Faces
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    multiple_of: float | None = None

    @property
    def choices(self) -> list[str] | None:
        """The allowed values of an enum field (a text field's built-in ones, with `Faces.choices_from`)."""
        enum = self.faces.choices_from or self.kind
        if isinstance(enum, type) and issubclass(enum, Enum):
            return [str(member.value) for member in enum]
        return None

    @property
    def open_choices(self) -> bool:
        """Whether the field also takes values outside `choices` (names of files in a folder)."""
        return self.faces.choices_from is not None

    def bounds_text(self) -> str:
        """The bounds in words, for help texts: `1..500`, `(0, 1]`, ..."""
        low = self.minimum if self.minimum is not None else self.exclusive_minimum
        high = self.maximum if self.maximum is not None else self.exclusive_maximum
        if low is None and high is None:
            return ""
        left = "[" if self.minimum is not None else "("
        right = "]" if self.maximum is not None else ")"
        text = f"{left}{_number(low) if low is not None else ''}, {_number(high) if high is not None else ''}{right}"
        return text + (f", multiple of {_number(self.multiple_of)}" if self.multiple_of else "")

    def schema(self) -> dict[str, Any]:
        """A plain description for `/v1/schema` (defaults, limits, names per face)."""
        kind = self.kind.__name__ if not self.choices else "enum"
        default = self.default.value if isinstance(self.default, Enum) else self.default
        entry: dict[str, Any] = {
            "name": self.name, "type": kind, "optional": self.optional, "required": self.required,
            "default": default, "description": self.description, "minimum": self.minimum, "maximum": self.maximum,
            "exclusive_minimum": self.exclusive_minimum, "exclusive_maximum": self.exclusive_maximum,
            "multiple_of": self.multiple_of, "choices": self.choices, "cli": self.faces.cli,
            "a1111": self.faces.a1111, "a1111_option": self.faces.a1111_option, "label": self.faces.label,
            "web": self.faces.web,
        }  # fmt: skip
        return entry


_BOUNDS = (
    (Ge, "ge", "minimum"),
    (Le, "le", "maximum"),
    (Gt, "gt", "exclusive_minimum"),
    (Lt, "lt", "exclusive_maximum"),
    (MultipleOf, "multiple_of", "multiple_of"),
)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _plain_kind(annotation: Any) -> tuple[type, bool]:
    """(`int`, True) for `int | None`; (`Mode`, False) for `Mode`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return rest[0], True
    return annotation, False


def field_table(model: type[BaseModel]) -> list[FieldSpec]:
    """Every field of `model`, in declaration order, with its faces and bounds.

    Raises:
        TypeError: a field is declared without `Faces` (every request field must say how faces name it).
    """
    table = []
    for name, info in model.model_fields.items():
        faces = next((item for item in info.metadata if isinstance(item, Faces)), None)
        if faces is None:
            raise TypeError(f"{model.__name__}.{name} has no Faces annotation")
        kind, optional = _plain_kind(info.annotation)
        bounds: dict[str, float] = {}
        for item in info.metadata:
            for constraint, attribute, key in _BOUNDS:
                if isinstance(item, constraint):
                    bounds[key] = getattr(item, attribute)
        required = info.default is PydanticUndefined
        table.append(
            FieldSpec(
                name,
                kind,
                optional,
                None if required else info.default,
                required,
                info.description or "",
                faces,
                **bounds,
            )
        )
    return table
