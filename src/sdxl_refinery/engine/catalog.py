"""The models folder: SDXL checkpoints by name, each classified from its header or configs, never loaded.

Names are paths inside the folder without `.safetensors` (`juggernaut/v9`), or a
diffusers folder's path; A1111's clients also name a model by its title
(`name [hash10]`) or its file name, and `find` takes any of them. A scan reads
headers only; hashes are the A1111 model hash, cached per file version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError
from .single_file import SIDECAR_SUFFIX, inspect_checkpoint
from .sources import default_hash_cache, short_hash, weights_file

MODEL_SUFFIX = ".safetensors"
_ROLES = {"StableDiffusionXLPipeline": "base", "StableDiffusionXLImg2ImgPipeline": "refiner",
          "StableDiffusionXLInpaintPipeline": "inpainting"}  # fmt: skip


@dataclass(frozen=True)
class CatalogEntry:
    """One usable checkpoint in the folder.

    Attributes:
        name: its path in the folder, without `.safetensors`.
        path: the file or diffusers folder.
        role: `base`, `refiner` or `inpainting` (a 9-channel base, for masked edits only).
        layout: `single file` or `diffusers folder`.
        sampling: how its predictions are read (`epsilon`, `v-prediction + zero terminal SNR`, ...).
        hash: A1111's model hash (10 hex digits), when the weights are there to hash.
    """

    name: str
    path: Path
    role: str
    layout: str
    sampling: str
    hash: str | None

    @property
    def title(self) -> str:
        """A1111's title: `name [hash]`."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def describe(self) -> dict[str, str | None]:
        return {"name": self.name, "title": self.title, "role": self.role, "layout": self.layout,
                "sampling": self.sampling, "hash": self.hash, "path": str(self.path)}  # fmt: skip


@dataclass(frozen=True)
class Unusable:
    """A file in the folder that is not an SDXL base, refiner or inpainting checkpoint, and why."""

    name: str
    reason: str


# What a hostile or damaged file's header or config can raise while it is read (a JSON bomb's recursion, a list
# where a mapping belongs, missing offsets): each makes that one file unusable, never the listing.
HOSTILE_FILE_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, RecursionError)


class ModelFolder:
    """The checkpoints under `root`, scanned on each listing (headers only; hashes cached)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        # What each file version was found to be: a scan reads a header again only when a file changes.
        self._seen: dict[tuple[str, int, int, int], CatalogEntry | Unusable] = {}

    def scan(self) -> tuple[list[CatalogEntry], list[Unusable]]:
        """Every checkpoint in the folder, classified, and the files that are not usable with the reason."""
        if self.root is None or not self.root.is_dir():
            return [], []
        entries: list[CatalogEntry] = []
        unusable: list[Unusable] = []
        folders = sorted(index.parent for index in self.root.rglob("model_index.json"))
        for folder in folders:
            self._classify(folder, entries, unusable)
        for path in sorted(self.root.rglob(f"*{MODEL_SUFFIX}")):
            if not any(folder in path.parents for folder in folders):
                self._classify(path, entries, unusable)
        return sorted(entries, key=lambda entry: entry.name), sorted(unusable, key=lambda item: item.name)

    def _classify(self, path: Path, entries: list[CatalogEntry], unusable: list[Unusable]) -> None:
        assert self.root is not None
        name = path.relative_to(self.root).as_posix().removesuffix(MODEL_SUFFIX)
        marker = path / "model_index.json" if path.is_dir() else path
        sidecar = path.with_name(name.rsplit("/", 1)[-1] + SIDECAR_SUFFIX)  # it changes how a file is read
        try:
            stat = marker.stat()
            version = (str(path), stat.st_size, stat.st_mtime_ns,
                       sidecar.stat().st_mtime_ns if sidecar.exists() else 0)  # fmt: skip
        except OSError as error:  # a dangling link, a folder named like a file without its index, no access
            unusable.append(Unusable(name, f"cannot be read: {error.strerror or error}"))
            return
        found = self._seen.get(version)
        if found is None:
            try:
                found = _folder_entry(name, path) if path.is_dir() else _file_entry(name, path)
            except ModelLoadError as error:
                found = Unusable(name, str(error).removeprefix(f"{path}: "))
            except HOSTILE_FILE_ERRORS as error:  # a header or config of another shape: this file alone is out
                found = Unusable(name, f"not a readable checkpoint ({type(error).__name__}: {str(error)[:200]})")
            self._seen[version] = found
        if isinstance(found, CatalogEntry):
            entries.append(found)
        else:
            unusable.append(found)

    def find(self, reference: str) -> CatalogEntry | None:
        """The entry `reference` names: its name, title (`name [hash]`), file name or hash."""
        wanted = reference.strip()
        for entry in self.scan()[0]:
            if wanted in (entry.name, entry.title, entry.path.name, entry.hash) or (
                wanted.endswith("]") and wanted.split(" [")[0] == entry.name
            ):
                return entry
        return None


def _file_entry(name: str, path: Path) -> CatalogEntry:
    info = inspect_checkpoint(path)
    role = "inpainting" if info.inpainting else info.kind.removeprefix("sdxl-")
    return CatalogEntry(name, path, role, "single file", info.sampling.describe(),
                        short_hash(path, default_hash_cache()))  # fmt: skip


def _folder_entry(name: str, path: Path) -> CatalogEntry:
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    role = _ROLES.get(str(index.get("_class_name")))
    if role is None:
        raise ModelLoadError(f"{path}: not an SDXL pipeline ({index.get('_class_name')})")
    unet = _json(path / "unet" / "config.json")
    if role == "base" and unet.get("in_channels") == 9:
        role = "inpainting"
    scheduler = _json(path / "scheduler" / "scheduler_config.json")
    sampling = "v-prediction" if scheduler.get("prediction_type") == "v_prediction" else "epsilon"
    if scheduler.get("rescale_betas_zero_snr"):
        sampling += " + zero terminal SNR"
    weights = weights_file(path)
    return CatalogEntry(name, path, role, "diffusers folder", sampling,
                        short_hash(weights, default_hash_cache()) if weights else None)  # fmt: skip


def _json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    loaded = json.loads(path.read_text(encoding="utf-8"))
    return loaded if isinstance(loaded, dict) else {}
