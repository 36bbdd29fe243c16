"""The tiny pair has SDXL's wiring, and the model name `tiny` serves it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from sdxl_refinery import GenerationRequest, ImageService, ModelLoadError
from sdxl_refinery.engine.sources import SourceKind, resolve


def test_saved_pair_has_sdxl_wiring(tiny_pair: tuple[Path, Path]) -> None:
    base, refiner = tiny_pair
    base_unet = json.loads((base / "unet" / "config.json").read_text())
    refiner_unet = json.loads((refiner / "unet" / "config.json").read_text())
    assert base_unet["addition_embed_type"] == refiner_unet["addition_embed_type"] == "text_time"
    encoder_2 = json.loads((base / "text_encoder_2" / "config.json").read_text())
    # base: 6 time ids + pooled text; refiner: 5 time ids (aesthetic score) + pooled text
    assert base_unet["projection_class_embeddings_input_dim"] == 6 * 8 + encoder_2["projection_dim"]
    assert refiner_unet["projection_class_embeddings_input_dim"] == 5 * 8 + encoder_2["projection_dim"]
    assert refiner_unet["cross_attention_dim"] == encoder_2["hidden_size"]
    index = json.loads((refiner / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    for part in ("text_encoder_2", "vae"):
        ours = load_file(next((base / part).glob("*.safetensors")))
        theirs = load_file(next((refiner / part).glob("*.safetensors")))
        assert ours.keys() == theirs.keys()
        assert all(np.array_equal(ours[k].numpy(), theirs[k].numpy()) for k in ours)


async def test_model_name_tiny_runs_end_to_end() -> None:
    service = ImageService("tiny", "tiny", device="cpu", precision="full")
    try:
        result = await service.generate(
            GenerationRequest(prompt="x", width=256, height=256, num_inference_steps=3, refiner_steps=2, seed=1)
        )
    finally:
        service.close()
    assert result.refined and result.models["base"] == "tiny"
    assert result.images[0].size == (256, 256)


def test_refiner_shares_encoder_and_vae_in_memory(service: ImageService) -> None:
    import asyncio

    asyncio.run(service.load())
    pair = service._engine.pair  # type: ignore[union-attr]
    assert pair.refiner.text_encoder_2 is pair.base.text_encoder_2
    assert pair.refiner.vae is pair.base.vae


@pytest.mark.parametrize("reference", ["./no/such/folder", "not a hub id"])
def test_unresolvable_reference_says_what_was_found(reference: str) -> None:
    with pytest.raises(ModelLoadError, match="base model"):
        resolve(reference, "base")


def test_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        resolve(str(tmp_path), "refiner")


def test_hub_ids_and_folders_resolve(tiny_pair: tuple[Path, Path]) -> None:
    assert resolve("stabilityai/stable-diffusion-xl-base-1.0", "base").kind is SourceKind.HUB
    assert resolve(str(tiny_pair[0]), "base").kind is SourceKind.FOLDER
    assert resolve("tiny", "base").kind is SourceKind.TINY


async def test_mixing_tiny_with_a_real_model_is_refused(tiny_pair: tuple[Path, Path]) -> None:
    service = ImageService("tiny", str(tiny_pair[1]), device="cpu")
    with pytest.raises(ModelLoadError, match="comes as a pair"):
        await service.load()
    service.close()
