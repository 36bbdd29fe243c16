"""Textual-inversion embeddings, read without any model: the folder, which ones a prompt uses, the checks.

An SDXL embedding holds two tensors, `clip_l` (vectors for CLIP ViT-L, 768 wide in SDXL) and `clip_g`
(for OpenCLIP ViT-bigG, 1280 wide), one row per vector. As in A1111, a prompt uses an embedding by writing
its name (the file's path in the folder without the suffix) as a word, in the prompt or the negative prompt.
SD 1.x/2.x embeddings (`emb_params`, or A1111's `string_to_param` in a `.pt`) are listed as unusable: their
vectors were trained for another text encoder. The engine applies them (engine/embedding_vectors.py).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest
from .loras import read_header

SUFFIXES = (".safetensors", ".pt")
HASH_DIGITS = 12  # A1111's `TI hashes`: the first 12 hex digits of the file's sha256
SDXL_PARTS = ("clip_l", "clip_g")


class UnusableEmbedding(Exception):
    """A file of the embeddings folder that cannot be used, and why (`str(error)`)."""


@dataclass(frozen=True)
class EmbeddingFile:
    """An SDXL embedding checked from its header: its name, file, vector count, widths and hash."""

    name: str
    path: Path
    vectors: int
    widths: tuple[int, int]  # clip_l's, clip_g's
    short_hash: str


def _sd1_reason(width: int) -> str:
    family = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"a model with {width}-wide text vectors")
    return f"an embedding for {family}, not SDXL (SDXL embeddings hold clip_l and clip_g vectors)"


def _checked(name: str, path: Path) -> EmbeddingFile:
    """Raises: UnusableEmbedding: not SDXL, unreadable, or vectors of two counts."""
    if path.suffix.lower() == ".pt":
        import torch

        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure to read the file makes it unusable, with its reason
            raise UnusableEmbedding(f"not readable as weights only ({str(error).splitlines()[0][:200]})") from None
        params = data.get("string_to_param", {}).get("*") if isinstance(data, dict) else None
        if params is not None and hasattr(params, "shape"):
            raise UnusableEmbedding(_sd1_reason(int(params.shape[-1])))
        raise UnusableEmbedding("a .pt file without SDXL vectors (SDXL embeddings come as .safetensors)")
    try:
        header = read_header(path, name)
    except InvalidRequest as error:
        raise UnusableEmbedding(error.rule.removeprefix(f"{name}: ")) from None
    if "emb_params" in header:
        raise UnusableEmbedding(_sd1_reason(int(header["emb_params"]["shape"][-1])))
    shapes = {part: header[part]["shape"] for part in SDXL_PARTS if part in header}
    if set(shapes) != set(SDXL_PARTS):
        raise UnusableEmbedding("no clip_l and clip_g tensors: not a textual-inversion embedding for SDXL")
    if any(len(shape) != 2 for shape in shapes.values()) or shapes["clip_l"][0] != shapes["clip_g"][0]:
        raise UnusableEmbedding(f"clip_l {shapes['clip_l']} and clip_g {shapes['clip_g']} must be (vectors, width) "
                                "with as many vectors")  # fmt: skip
    widths = (int(shapes["clip_l"][1]), int(shapes["clip_g"][1]))
    return EmbeddingFile(name, path, int(shapes["clip_l"][0]), widths, file_hash(path))


def file_hash(path: Path) -> str:
    """The first 12 hex digits of the file's sha256, read once per version of the file."""
    status = path.stat()
    return _hash_of(path.resolve(), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hash_of(path: Path, size: int, modified_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:HASH_DIGITS]


def mentions(text: str, name: str) -> bool:
    """Whether `text` writes `name` as a word of its own (not inside another word)."""
    return re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w/.-])", text) is not None


class EmbeddingFolder:
    """The embeddings folder (`REFINERY_EMBEDDINGS_DIR`): files named by their path in it without the suffix."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def scan(self) -> tuple[list[EmbeddingFile], dict[str, str]]:
        """Every usable SDXL embedding, sorted by name, and the other files with the reason."""
        if self.folder is None or not self.folder.is_dir():
            return [], {}
        usable, unusable = [], {}
        for path in sorted(self.folder.rglob("*")):
            if not path.is_file() or path.suffix.lower() not in SUFFIXES:
                continue
            name = path.relative_to(self.folder).with_suffix("").as_posix()
            try:
                usable.append(_checked(name, path))
            except UnusableEmbedding as error:
                unusable[name] = str(error)
            except OSError as error:
                unusable[name] = f"unreadable ({error.strerror or error})"
        return usable, unusable

    def used_by(self, *texts: str) -> list[EmbeddingFile]:
        """The usable embeddings whose names the texts write as words, longest names first (so that
        `style-v2` is found before `style`)."""
        usable, _ = self.scan()
        return [embedding for embedding in sorted(usable, key=lambda e: -len(e.name))
                if any(mentions(text, embedding.name) for text in texts)]  # fmt: skip
