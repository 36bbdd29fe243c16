"""LoRA files, read without any model: A1111's `<lora:name:weight>` prompt syntax, the LoRA folder, and the
checks made before any work (name, file, format, architecture), all from the safetensors header.

The engine applies them (engine/lora_weights.py). Only safetensors files are read: pickle formats can run
code when loaded, as for checkpoints.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequest

MAX_WEIGHT = 5.0
MAX_LORAS = 8
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
SDXL_CONTEXT_DIM = 2048  # SDXL base's cross-attention width (CLIP-L 768 + OpenCLIP-G 1280)
_CONTEXTS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "the SDXL refiner", 2048: "SDXL"}
# <lora:name> or <lora:name:weight> (A1111 also allows further :-separated values, which it reads as
# per-block weights; those are refused below rather than ignored).
_PROMPT_TAG = re.compile(r"<lora:([^:>]+)(?::([^>]*))?>")
# LyCORIS variants that diffusers cannot load faithfully, by the key parts that mark them.
_LYCORIS = {"hada_w1": "LyCORIS LoHa", "lokr_w1": "LyCORIS LoKr", ".diff": "LyCORIS full-difference",
            "oft_blocks": "LyCORIS OFT", "lora_mid": "LyCORIS LoCon with a mid (Tucker) weight"}  # fmt: skip


class LoraRef(BaseModel):
    """One LoRA for a request: a name from the LoRA folder (or a file path, for the library and CLI) and its
    weight (1.0 applies it as trained; negative weights subtract it, as in A1111)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=255, description="A name from the LoRA folder, or a path.")
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False, description="-5..5")


def split_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """The prompt without its `<lora:name:weight>` tags (what the text encoders see), and the LoRAs named.

    Raises:
        InvalidRequest: a tag whose weight is not a number in -5..5 (field `prompt`).
    """
    found: list[LoraRef] = []
    for match in _PROMPT_TAG.finditer(prompt):
        name, weight_text = match.group(1).strip(), match.group(2)
        weight = 1.0
        if weight_text is not None:
            try:
                weight = float(weight_text)
            except ValueError:
                raise InvalidRequest("prompt", f"<lora:{name}:{weight_text}>: the weight must be a number "
                                     "(per-block weights are not supported)") from None  # fmt: skip
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
            raise InvalidRequest("prompt", f"<lora:{name}:{weight_text}>: the weight must be within -5..5")
        found.append(LoraRef(name=name, weight=weight))
    return _PROMPT_TAG.sub("", prompt), found


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file checked from its header: where it is, what it was made for, what it touches."""

    name: str
    path: Path
    short_hash: str  # A1111's: the first 12 hex digits of the sha256 of the tensors (header excluded)
    parts: tuple[str, ...]  # which of unet, text_encoder, text_encoder_2 it changes
    metadata: dict[str, str]
    context_width: int | None  # the cross-attention width it was trained for, when its keys tell


def read_header(path: Path, name: str | None = None) -> dict[str, Any]:
    """The safetensors header of `path` (tensor names, dtypes, shapes; `__metadata__`); errors name the
    LoRA as `name` (default: the file's name).

    Raises:
        InvalidRequest: not a safetensors file, or truncated (field `loras`).
    """
    name = name or path.name
    if path.suffix.lower() != ".safetensors":
        raise InvalidRequest("loras", f"{name}: only .safetensors LoRAs are loaded (pickle formats can run "
                             "code when loaded)")  # fmt: skip
    try:
        with path.open("rb") as file:
            size = file.seek(0, 2)
            file.seek(0)
            (length,) = struct.unpack("<Q", file.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):  # read nothing a garbage length points at
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header: dict[str, Any] = checked_header_shape(json.loads(file.read(length)))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
            if size < 8 + length + end:
                raise InvalidRequest("loras", f"{name}: truncated ({size} bytes, its header says "
                                     f"{8 + length + end})")  # fmt: skip
    except (OSError, struct.error, ValueError, KeyError, TypeError, RecursionError) as error:
        raise InvalidRequest("loras", f"{name}: not a readable safetensors file ({str(error)[:200]})") from None
    return header


def checked_header_shape(header: Any) -> dict[str, Any]:
    """A safetensors header's shape: a mapping of tensors, each with a dtype, a shape and two data offsets,
    and an optional `__metadata__` mapping.

    Raises:
        ValueError: naming what is of another shape.
    """
    if not isinstance(header, dict):
        raise ValueError(f"the header is a {type(header).__name__}, not a mapping")
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict):
                raise ValueError("__metadata__ is not a mapping")
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and isinstance(entry.get("shape"), list)):  # fmt: skip
            raise ValueError(f"tensor {key[:80]!r} has no shape and two data offsets")
    return header


def short_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of the file after its safetensors header, first 12 hex digits (read once per
    version of the file: every submission and listing checks its LoRAs)."""
    status = path.stat()
    return _hash_of(path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash_of(path: Path, size: int, modified_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        file.seek(8 + length)
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _parts(keys: list[str]) -> tuple[str, ...]:
    parts = []
    if any(key.startswith(("unet.", "lora_unet_")) or "down_blocks" in key or "up_blocks" in key for key in keys):
        parts.append("unet")
    if any(key.startswith(("text_encoder.", "lora_te1_", "lora_te_")) for key in keys):
        parts.append("text_encoder")
    if any(key.startswith(("text_encoder_2.", "lora_te2_")) for key in keys):
        parts.append("text_encoder_2")
    return tuple(parts)


def _context_width(header: dict[str, Any]) -> int | None:
    """The cross-attention input width the LoRA was trained for, read from an attn2 key/value down-projection."""
    for key, entry in header.items():
        if key == "__metadata__" or not re.search(r"attn2[._]to_[kv]", key):
            continue
        if re.search(r"(lora_A|lora_down|lora\.down)\.weight$", key) and len(entry["shape"]) == 2:
            return int(entry["shape"][1])
    return None


def made_for(width: int) -> str:
    """The model family a cross-attention width belongs to, in words."""
    return _CONTEXTS.get(width, f"a model with {width}-wide cross-attention")


def check_file(name: str, path: Path, context_width: int | None = SDXL_CONTEXT_DIM) -> LoraFile:
    """Check a LoRA file before any work: readable safetensors, a format diffusers loads faithfully, made
    for this architecture (its cross-attention width is `context_width`; None leaves that to the engine).

    Raises:
        InvalidRequest: naming the LoRA and the reason (field `loras`).
    """
    header = read_header(path, name)
    keys = [key for key in header if key != "__metadata__"]
    for mark, kind in _LYCORIS.items():
        if any(mark in key for key in keys):
            raise InvalidRequest("loras", f"{name}: {kind} files are not supported (diffusers cannot apply them "
                                 "faithfully); plain LoRA (Kohya or diffusers/PEFT layout) is")  # fmt: skip
    parts = _parts(keys)
    if not parts:
        raise InvalidRequest("loras", f"{name}: no LoRA weights for a UNet or text encoder in this file")
    width = _context_width(header)
    if width is not None and context_width is not None and width != context_width:
        raise InvalidRequest("loras", f"{name}: made for {made_for(width)}, not for this SDXL base model")
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    return LoraFile(name, path, short_hash(path), parts, metadata, width)


class LoraFolder:
    """The LoRA folder (`REFINERY_LORA_DIR`): `.safetensors` files, named by their path without the suffix
    relative to the folder (`style/ink` for `style/ink.safetensors`), as A1111 names them."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def names(self) -> list[str]:
        """Every LoRA name in the folder, sorted."""
        if self.folder is None or not self.folder.is_dir():
            return []
        files = self.folder.rglob("*.safetensors")
        return sorted(path.relative_to(self.folder).with_suffix("").as_posix() for path in files)

    def path_of(self, name: str, allow_paths: bool) -> Path:
        """The file a LoRA name means: a name in the folder, or (library and CLI only) a file path.

        Raises:
            InvalidRequest: unknown name, or a path where only names are allowed (field `loras`).
        """
        if self.folder is not None and name in self.names():
            return self.folder / f"{name}.safetensors"
        candidate = Path(name).expanduser()
        if allow_paths and candidate.suffix.lower() == ".safetensors" and candidate.is_file():
            return candidate
        names = self.names()
        known = f"known: {', '.join(names[:20])}" if names else "the LoRA folder holds none"
        raise InvalidRequest("loras", f"{name}: no such LoRA ({known})")

    def check(
        self, loras: list[LoraRef], allow_paths: bool, context_width: int | None = SDXL_CONTEXT_DIM
    ) -> list[LoraFile]:
        """Resolve and check each LoRA of a request, before any work.

        Raises:
            InvalidRequest: the first bad one, named with its position and the reason (field `loras`).
        """
        if len(loras) > MAX_LORAS:
            raise InvalidRequest("loras", f"at most {MAX_LORAS} LoRAs per request, got {len(loras)}")
        checked = []
        for index, lora in enumerate(loras):
            try:
                checked.append(check_file(lora.name, self.path_of(lora.name, allow_paths), context_width))
            except InvalidRequest as error:
                raise InvalidRequest("loras", f"loras[{index}] {error.rule}") from None
        return checked
