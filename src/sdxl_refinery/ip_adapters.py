"""The IP-Adapter folder, read without any model: which files are IP-Adapters for this base, and why others
are not.

An IP-Adapter is a `.safetensors` file holding `image_proj.*` (the image projection) and `ip_adapter.*` (the
cross-attention key and value weights) tensors, named by its path in the folder without the suffix; its image
encoder is the `image_encoder` folder beside it (a CLIP vision model with projection), as in h94/IP-Adapter's
`sdxl_models`. It fits the base when its cross-attention width is the base's (2048 for SDXL).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest
from .loras import SDXL_CONTEXT_DIM, made_for, read_header


@dataclass(frozen=True)
class IpAdapterEntry:
    """One file of the IP-Adapter folder: usable (`reason` None), or why not."""

    name: str
    path: Path
    reason: str | None = None

    @property
    def image_encoder(self) -> Path:
        return self.path.parent / "image_encoder"


def _entry(name: str, path: Path, context_width: int) -> IpAdapterEntry:
    try:
        header = read_header(path, name)
    except InvalidRequest as error:
        return IpAdapterEntry(name, path, error.rule)
    keys = [key for key in header if key != "__metadata__"]
    if not any(key.startswith("image_proj.") for key in keys) or not any(key.startswith("ip_adapter.") for key in keys):
        return IpAdapterEntry(name, path, "no image_proj and ip_adapter tensors: not an IP-Adapter")
    if any(key.startswith("ip_adapter.") and "_lora." in key for key in keys):
        return IpAdapterEntry(name, path, "an IP-Adapter FaceID: it takes face embeddings (insightface's), which "
                                          "Refinery does not make")  # fmt: skip
    width = next((int(header[key]["shape"][1]) for key in keys if key.endswith(".to_k_ip.weight")), None)
    if width != context_width:
        return IpAdapterEntry(name, path, f"made for {made_for(width or 0)}, not for this SDXL base model")
    if not (path.parent / "image_encoder" / "config.json").is_file():
        return IpAdapterEntry(name, path, f"no image encoder beside it ({path.parent / 'image_encoder'})")
    return IpAdapterEntry(name, path)


class IpAdapterFolder:
    """The IP-Adapter folder (`REFINERY_IP_ADAPTER_DIR`), judged file by file."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def entries(self, context_width: int = SDXL_CONTEXT_DIM) -> list[IpAdapterEntry]:
        """Every `.safetensors` file outside image encoder folders, sorted by name, usable or with its reason."""
        if self.folder is None or not self.folder.is_dir():
            return []
        found = [_entry(path.relative_to(self.folder).with_suffix("").as_posix(), path, context_width)
                 for path in self.folder.rglob("*.safetensors")
                 if path.is_file() and "image_encoder" not in path.relative_to(self.folder).parts]  # fmt: skip
        return sorted(found, key=lambda entry: entry.name)

    def check(self, names: list[str], context_width: int = SDXL_CONTEXT_DIM) -> list[Path]:
        """The file of each image prompt's IP-Adapter, checked before any work; all must share one image encoder
        (diffusers runs one per pipeline).

        Raises:
            InvalidRequest: naming `image_prompts.N.model`: unknown, unusable and why, or another encoder.
        """
        entries = {entry.name: entry for entry in self.entries(context_width)}
        files: list[Path] = []
        for index, name in enumerate(names):
            field = f"image_prompts.{index}.model"
            entry = entries.get(name)
            if entry is None:
                usable = [known for known, found in entries.items() if found.reason is None]
                listed = f"known: {', '.join(usable[:20])}" if usable else "the IP-Adapter folder holds none"
                raise InvalidRequest(field, f"no IP-Adapter {name!r}; {listed} (GET /v1/ip-adapters)")
            if entry.reason is not None:
                raise InvalidRequest(field, f"IP-Adapter {name!r} cannot be used: {entry.reason}")
            if files and entry.image_encoder != files[0].parent / "image_encoder":
                raise InvalidRequest(field, f"IP-Adapter {name!r} has another image encoder than the first one's; "
                                            "image prompts of one request must share their encoder")  # fmt: skip
            files.append(entry.path)
        return files
