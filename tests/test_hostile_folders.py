"""One bad file in the models or LoRA folder is listed as unusable with its reason; it never fails a listing,
a route or a command (issue 31, item 1: the files an attacker or a careless download leaves there)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdxl_refinery.cli import app
from sdxl_refinery.engine.catalog import ModelFolder
from sdxl_refinery.errors import InvalidRequest
from sdxl_refinery.loras import LoraFolder, check_file


def _safetensors(path: Path, header: object, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


TENSOR = {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}


def plant_hostile_files(folder: Path) -> set[str]:
    """Every shape of bad file the attacker's report names; returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dangling.safetensors").symlink_to(folder / "nowhere.safetensors")
    (folder / "a-folder.safetensors").mkdir()
    _safetensors(folder / "json-bomb.safetensors", b"[" * 100_000 + b"]" * 100_000)
    _safetensors(folder / "list-header.safetensors", [1, 2, 3])
    _safetensors(folder / "string-header.safetensors", "a string")
    _safetensors(folder / "metadata-list.safetensors", {"__metadata__": [1], "lora_unet_x.lora_down.weight": TENSOR},
                 b"0000")  # fmt: skip
    _safetensors(folder / "no-offsets.safetensors", {"lora_unet_x.lora_down.weight": {**TENSOR, "data_offsets": []}})
    far = {**TENSOR, "data_offsets": [0, 10**9]}
    _safetensors(folder / "past-the-end.safetensors", {"lora_unet_x.lora_down.weight": far})
    bad_index = folder / "bad-index"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("{not json")
    list_index = folder / "list-index"
    list_index.mkdir()
    (list_index / "model_index.json").write_text("[1]")
    bad_config = folder / "bad-config"
    (bad_config / "unet").mkdir(parents=True)
    (bad_config / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    (bad_config / "unet" / "config.json").write_text("[[[")
    return {"dangling", "a-folder", "json-bomb", "list-header", "string-header", "metadata-list", "no-offsets",
            "past-the-end", "bad-index", "list-index", "bad-config"}  # fmt: skip


def test_the_models_folder_lists_each_bad_file_as_unusable_with_a_reason(tmp_path: Path) -> None:
    names = plant_hostile_files(tmp_path / "models")
    entries, unusable = ModelFolder(tmp_path / "models").scan()
    assert entries == []
    assert {item.name for item in unusable} == names
    assert all(item.reason for item in unusable)
    reasons = {item.name: item.reason for item in unusable}
    assert "cannot be read" in reasons["dangling"] and "truncated" in reasons["past-the-end"]


def test_each_bad_lora_is_refused_naming_it_never_with_another_error(tmp_path: Path) -> None:
    names = plant_hostile_files(tmp_path / "loras")
    folder = LoraFolder(tmp_path / "loras")
    single_files = names - {"bad-index", "list-index", "bad-config"}
    assert set(folder.names()) == single_files
    for name in single_files:
        with pytest.raises(InvalidRequest) as caught:
            check_file(name, folder.path_of(name, allow_paths=False))
        assert caught.value.field == "loras" and name in caught.value.rule


def test_models_and_loras_list_commands_exit_0_beside_bad_files(tmp_path: Path) -> None:
    plant_hostile_files(tmp_path / "models")
    plant_hostile_files(tmp_path / "loras")
    runner = CliRunner()
    env = {"REFINERY_DATA_DIR": str(tmp_path)}
    models = runner.invoke(app, ["models", "list"], env=env)
    assert models.exit_code == 0, models.output
    assert "json-bomb" in models.output and "Traceback" not in models.output
    loras = runner.invoke(app, ["loras", "list"], env=env)
    assert loras.exit_code == 0, loras.output
    assert "list-header" in loras.output
