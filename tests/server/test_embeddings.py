"""The embeddings folder over A1111's API, as webuiapi and A1111's own tests read it."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save_file

from sdxl_refinery import ImageService
from sdxl_refinery.embeddings import EmbeddingFolder
from tests.fakes import FakeEngine

from .conftest import ServerFactory


def test_embeddings_are_listed_loaded_or_skipped_as_a1111_lists_them(
    server_factory: ServerFactory, fake: tuple[ImageService, FakeEngine], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"clip_l": torch.zeros(3, 768), "clip_g": torch.zeros(3, 1280)}, str(folder / "negXL.safetensors"))
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "easynegative.safetensors"))
    monkeypatch.setattr(fake[0], "embedding_folder", EmbeddingFolder(folder))
    with server_factory() as server:
        listed = requests.get(server.url + "/sdapi/v1/embeddings", timeout=60).json()
        assert listed["loaded"] == {"negXL": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                              "shape": 2048, "vectors": 3}}  # fmt: skip
        assert "SD 1.x, not SDXL" in listed["skipped"]["easynegative"]["reason"]
        assert requests.post(server.url + "/sdapi/v1/refresh-embeddings", timeout=60).status_code == 200
