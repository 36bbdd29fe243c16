"""Model references: one place turns what a user wrote into what gets loaded.

A reference is the name `tiny`, a local diffusers folder (one holding
`model_index.json`), a single-file checkpoint (`.safetensors`), or a Hugging
Face Hub id (`owner/name`). Each resolved source carries a short SHA-256 of its
weights (A1111's "Model hash": the first 10 hex digits), which goes into every
image's metadata.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..errors import ModelLoadError
from .tiny import TINY_NAME

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceKind(str, Enum):
    TINY = "tiny"
    FOLDER = "folder"
    SINGLE_FILE = "file"
    HUB = "hub"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model reference.

    Attributes:
        kind: tiny, folder or hub.
        location: the folder path or Hub id (`tiny` for the tiny pair).
        name: a short name for metadata (folder or repository name).
    """

    kind: SourceKind
    location: str
    name: str

    def describe(self) -> str:
        return f"{self.kind.value}:{self.location}"


def resolve(reference: str, role: str) -> ModelSource:
    """Resolve a base or refiner reference.

    Args:
        reference: `tiny`, a diffusers folder path, or a Hub id.
        role: `base` or `refiner`, used in error messages.

    Raises:
        ModelLoadError: the reference is none of the above, naming what was found.
    """
    if reference == TINY_NAME:
        return ModelSource(SourceKind.TINY, TINY_NAME, TINY_NAME)
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"{role} model {reference}: folder has no model_index.json, so it is no diffusers folder"
            )
        return ModelSource(SourceKind.FOLDER, str(path.resolve()), path.resolve().name)
    if path.is_file():
        return ModelSource(SourceKind.SINGLE_FILE, str(path.resolve()), path.stem)
    if _HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        return ModelSource(SourceKind.HUB, reference, reference.split("/")[-1])
    raise ModelLoadError(f"{role} model {reference!r}: no such folder, and not a Hub id of the form owner/name")


def short_hash(path: Path, chunk: int = 1 << 24) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:10]


def weights_file(folder: Path) -> Path | None:
    """The UNet weights of a diffusers folder: what identifies a fine-tune."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / "unet" / name).is_file():
            return folder / "unet" / name
    return None
