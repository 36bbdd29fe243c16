"""PNG files with their own recipe: atomic writes, A1111 `parameters`, JSON metadata.

A file is written to a temporary name in its destination folder and renamed
into place, so a crash, a full disk or a cancellation never leaves a partial
PNG under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .control import ControlUnit, ImagePrompt
from .errors import StorageError
from .input_images import HASH_LENGTH
from .request import REQUEST_FIELDS, GenerationRequest

PARAMETERS_KEY = "parameters"  # what A1111, ComfyUI and Civitai read
METADATA_KEY = "refinery"  # our JSON: the whole request and result
_A1111_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size")


def a1111_parameters(metadata: dict[str, Any], index: int = 0) -> str:
    """Format one image's metadata as A1111's `parameters` text.

    The request's fields are written under their table labels (`Faces.label`), those
    sharing a label joined by `x` (Size); then what the run recorded (models, precision).

    Args:
        metadata: `GenerationResult.metadata()` output.
        index: which image of the batch the text describes (picks its seed).
    """
    request = {**metadata["request"], "seed": metadata["seeds"][index]}
    recipe = GenerationRequest(**metadata["request"])
    # Not refined (disabled, or stage 2 failed): the refiner's fields had no effect on this image.
    as_run = recipe.model_copy(update={"use_refinement": recipe.use_refinement and metadata["refined"]})
    inactive = as_run.inactive_fields()
    models = metadata.get("models", {})
    labelled: dict[str, list[str]] = {}
    for spec in REQUEST_FIELDS:
        if spec.faces.label and spec.name not in inactive and request.get(spec.name) is not None:
            labelled.setdefault(spec.faces.label, []).append(str(request[spec.name]))
    values = {label: "x".join(parts) for label, parts in labelled.items()}
    # A1111's own order first (readers such as Civitai expect it), then our fields in table order.
    fields: list[tuple[str, Any]] = [(label, values.pop(label, None)) for label in _A1111_ORDER]
    fields += [("Model hash", models.get("base_hash")), ("Model", models.get("base"))]
    fields += [("Lora hashes", _lora_hashes(metadata.get("loras") or []))]
    fields += [
        ("TI hashes", ", ".join(f"{ti['name']}: {ti['hash']}" for ti in metadata.get("embeddings") or []) or None)
    ]
    fields += [(label, _image_hash(request.get(name))) for name, label in _IMAGE_LABELS]
    fields += [(f"ControlNet {index}", ControlUnit(**unit).a1111_text())
               for index, unit in enumerate(request.get("controlnets") or [])]  # fmt: skip
    fields += [(f"IP-Adapter {index}", ImagePrompt(**prompt).a1111_text())
               for index, prompt in enumerate(request.get("image_prompts") or [])]  # fmt: skip
    if metadata["refined"]:
        fields += [("Refiner", models.get("refiner")), ("Refiner hash", models.get("refiner_hash"))]
    fields += list(values.items())
    fields += [("Precision", metadata["precision"]), ("Device", metadata["device"])]
    settings = ", ".join(f"{key}: {_quote(value)}" for key, value in fields if value is not None)
    # LoRAs given in the `loras` field are written as A1111 tags after the prompt, so that A1111 (or a reader of
    # this text) applies them too; tags already in the prompt stay where the user wrote them.
    lines = [request["prompt"] + "".join(f" <lora:{_lora_name(lora['name'])}:{lora['weight']:g}>"
                                         for lora in request.get("loras") or [])]  # fmt: skip
    if request["negative_prompt"]:
        lines.append(f"Negative prompt: {request['negative_prompt']}")
    lines.append(settings)
    return "\n".join(lines)


def _lora_name(name: str) -> str:
    """How A1111 names a LoRA: a path-named one by its file's stem."""
    return Path(name).stem if name.endswith(".safetensors") else name


_IMAGE_LABELS = (("init_image", "Init image hash"), ("mask_image", "Mask hash"))


def _image_hash(recorded: Any) -> str | None:
    """An input image's recorded sha256, shortened as A1111 shortens hashes (None without one)."""
    return str(recorded["sha256"])[:HASH_LENGTH] if isinstance(recorded, dict) and "sha256" in recorded else None


def _lora_hashes(loras: list[dict[str, Any]]) -> str | None:
    """A1111's `Lora hashes` value: `name: hash12, ...`."""
    return ", ".join(f"{_lora_name(lora['name'])}: {lora['hash']}" for lora in loras) or None


def _quote(value: Any) -> str:
    """A1111 quotes a value holding its separators."""
    text = str(value)
    return json.dumps(text) if any(mark in text for mark in ",:\n") else text


def parse_parameters(text: str) -> dict[str, Any]:
    """Request fields from an A1111 `parameters` text, through the table's labels.

    Labels the table does not know (A1111's own extras, our run records) are left out.

    Raises:
        StorageError: the text has no settings line.
    """
    lines = text.split("\n")
    if len(lines) < 2 or ": " not in lines[-1]:
        raise StorageError("the parameters text has no settings line")
    settings = dict(split_settings(lines[-1]))
    prompt_lines, negative = lines[:-1], ""
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt: "):
            negative = "\n".join([line.removeprefix("Negative prompt: "), *prompt_lines[i + 1 :]])
            prompt_lines = prompt_lines[:i]
            break
    fields: dict[str, Any] = {"prompt": "\n".join(prompt_lines), "negative_prompt": negative}
    by_label: dict[str, list[str]] = {}
    for spec in REQUEST_FIELDS:
        if spec.faces.label:
            by_label.setdefault(spec.faces.label, []).append(spec.name)
    for label, names in by_label.items():
        values = settings[label].split("x") if label in settings and len(names) > 1 else [settings.get(label)]
        if label in settings and len(values) == len(names):  # a malformed one (`Size: 64`) is left out, as A1111 does
            fields.update(zip(names, values, strict=True))
    return fields


def split_settings(line: str) -> list[tuple[str, str]]:
    """`key: value, key: "quoted, value"` pairs, as A1111 writes them; a quoted value that is not a JSON string
    (`"\\q"`) is kept as written, as A1111's own reader keeps it."""
    pairs = []
    for match in re.finditer(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', line):
        key, value = match.group(1).strip(), match.group(2).strip()
        if value.startswith('"'):
            with contextlib.suppress(ValueError):  # not a JSON string: the text as written is the value
                value = str(json.loads(value))
        pairs.append((key, value))
    return pairs


def write_png(
    image: Image.Image, path: Path, metadata: dict[str, Any], index: int = 0, parameters: str | None = None
) -> Path:
    """Write `image` to `path` atomically with its metadata chunks.

    Args:
        image: the picture.
        path: the final file name; parent folders are created.
        metadata: `GenerationResult.metadata()` output.
        index: the image's place in its batch.
        parameters: the A1111 `parameters` text, when not a generation's (an upscale's).

    Raises:
        StorageError: the folder cannot be created or the file cannot be written;
            no file is left under `path` or under a temporary name.
    """
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters if parameters is not None else a1111_parameters(metadata, index))
    info.add_text(METADATA_KEY, json.dumps({**metadata, "index": index}, sort_keys=True))
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.chmod(temporary, 0o666 & ~_umask())  # an image is meant to be shared: as open() would create it
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=info)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise StorageError(f"could not write {path}: {error.strerror or error}") from error
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask would set it for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o077)  # elsewhere: set a strict mask for the instant it takes to read it
    os.umask(current)
    return current


def check_writable_folder(path: Path) -> None:
    """Make sure `path`'s folder exists (creating it) and accepts new files.

    Raises:
        StorageError: naming the folder and why it cannot be used.
    """
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".refinery-probe-"):
            pass
    except OSError as error:
        raise StorageError(f"output folder {folder} is not writable: {error.strerror or error}") from error


def read_metadata(path: Path) -> dict[str, Any]:
    """Read the JSON metadata Refinery wrote into a PNG.

    Raises:
        StorageError: the file cannot be read or holds no Refinery metadata.
    """
    try:
        with Image.open(path) as image:
            text = image.info.get(METADATA_KEY)
            parameters = image.info.get(PARAMETERS_KEY)
    except OSError as error:
        raise StorageError(f"could not read {path}: {error}") from error
    if text is None:
        raise StorageError(f"{path} holds no Refinery metadata")
    metadata: dict[str, Any] = json.loads(text)
    metadata["parameters"] = parameters
    return metadata


def numbered_paths(output_path: Path, count: int) -> list[Path]:
    """The files a batch of `count` images goes to.

    One image goes to `output_path` itself; a batch goes to `stem-1.png`,
    `stem-2.png`, ... beside it, so no name is ambiguous.
    """
    if count == 1:
        return [output_path]
    return [output_path.with_name(f"{output_path.stem}-{i}{output_path.suffix or '.png'}") for i in range(1, count + 1)]
