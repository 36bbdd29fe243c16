"""Model references: one place turns what a user wrote into what gets loaded.

A reference is the name `tiny`, a local diffusers folder (one holding
`model_index.json`), a single-file checkpoint (`.safetensors`), or a Hugging
Face Hub id (`owner/name`). Each resolved source carries a short SHA-256 of its
weights (A1111's "Model hash": the first 10 hex digits), which goes into every
image's metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .single_file import inspect_checkpoint

TINY_NAME = "tiny"  # the random-weight pair built from configs (engine/tiny.py)
TINY_CONTEXT_DIM = 80  # the tiny base UNet's cross-attention width (its two encoders, 32 + 48)
TINY_ENCODER_LAYERS = 3  # layers of each tiny text encoder: the deepest clip skip it takes
SDXL_ENCODER_LAYERS = 12  # layers of SDXL's shallower text encoder (CLIP ViT-L; OpenCLIP bigG has 32)

log = logging.getLogger(__name__)

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
    if path.suffix.lower() in _FILE_SUFFIXES:  # "models/x.safetensors" would pass for a Hub id
        raise ModelLoadError(f"{role} model {reference}: no such file")
    if _HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        return ModelSource(SourceKind.HUB, reference, reference.split("/")[-1])
    raise ModelLoadError(f"{role} model {reference!r}: no such folder, and not a Hub id of the form owner/name")


_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
_EXPECTED_KIND = {"base": "sdxl-base", "refiner": "sdxl-refiner"}


def check_sources(base: ModelSource, refiner: ModelSource) -> None:
    """Refuse a pair that cannot load, from file headers alone (no torch, well under a second).

    Raises:
        ModelLoadError: a single file that is pickle, truncated, foreign or of the other role; or only
            one of the pair is `tiny`.
    """
    for role, source in (("base", base), ("refiner", refiner)):
        if source.kind is SourceKind.SINGLE_FILE:
            path = Path(source.location)
            kind = inspect_checkpoint(path).kind
            if kind != _EXPECTED_KIND[role]:
                raise ModelLoadError(f"{role} model {path}: is an {kind} checkpoint, expected {_EXPECTED_KIND[role]}")
    if (base.kind is SourceKind.TINY) != (refiner.kind is SourceKind.TINY):
        raise ModelLoadError("the tiny model comes as a pair: set both base and refiner to `tiny`")


def default_hash_cache() -> Path:
    """Where model hashes are remembered: `$XDG_CACHE_HOME/refinery/model-hashes.json`."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "refinery" / "model-hashes.json"


def short_hash(path: Path, cache: Path | None = None, chunk: int = 1 << 24) -> str:
    """A1111's model hash: the first 10 hex digits of the file's SHA-256.

    Hashing SDXL reads 7 GB, so with `cache` the digest is remembered per absolute
    path, size and modification time, and read again only when one of them changes.
    `refinery models verify` passes no cache: it always reads the file.
    """
    stat = path.stat()
    key, stamp = str(path.resolve()), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    known = _read_hash_cache(cache) if cache else {}
    entry = known.get(key)
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return str(entry["sha256"])[:10]
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    if cache:
        known[key] = {**stamp, "sha256": digest.hexdigest()}
        _write_hash_cache(cache, known)
    return digest.hexdigest()[:10]


def _read_hash_cache(cache: Path) -> dict[str, Any]:
    try:
        known = json.loads(cache.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("Model hash cache %s is unreadable (%s); it will be rebuilt", cache, error)
        return {}
    return known if isinstance(known, dict) else {}


def _write_hash_cache(cache: Path, known: dict[str, Any]) -> None:
    """Atomically (temporary file, then rename); a cache that cannot be written only costs time."""
    temporary: str | None = None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache.parent, delete=False, suffix=".tmp") as stream:
            temporary = stream.name
            json.dump(known, stream)
        os.replace(temporary, cache)
    except OSError as error:
        log.warning("Could not write the model hash cache %s: %s", cache, error)
        if temporary:
            Path(temporary).unlink(missing_ok=True)


def weights_file(folder: Path) -> Path | None:
    """The UNet weights of a diffusers folder: what identifies a fine-tune."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / "unet" / name).is_file():
            return folder / "unet" / name
    return None
