"""Textual-inversion embeddings on the tiny pair: written at test time as SDXL files (clip_l and clip_g), used
by name as A1111 does, giving what diffusers' `load_textual_inversion` on both encoders gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.embeddings import EmbeddingFolder
from sdxl_refinery.png import a1111_parameters

from .hand_driven import PROMPT, SIZE, HandDriven

WIDTHS = (32, 48)  # the tiny pair's CLIP-L and OpenCLIP widths


def _vectors(count: int, seed: int, widths: tuple[int, int] = WIDTHS) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"clip_l": torch.randn(count, widths[0], generator=generator),
            "clip_g": torch.randn(count, widths[1], generator=generator)}  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embeddings")
    save_file(_vectors(2, 1), str(root / "tinyemb.safetensors"))  # two vectors: tinyemb tinyemb_1
    (root / "neg").mkdir()
    save_file(_vectors(1, 2), str(root / "neg" / "blurry-ti.safetensors"))
    save_file({"emb_params": torch.zeros(4, 768)}, str(root / "sd15-style.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "old"}, root / "old.pt")
    return root


@pytest.fixture
def with_folder(service: ImageService, folder: Path, monkeypatch: pytest.MonkeyPatch) -> ImageService:
    monkeypatch.setattr(service, "embedding_folder", EmbeddingFolder(folder))
    return service


def _request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{"prompt": PROMPT, "seed": 7, "num_inference_steps": 6, "refiner_steps": 3, **SIZE,
                                **fields})  # fmt: skip


async def _pixels(service: ImageService, request: GenerationRequest) -> np.ndarray:
    result = await service.generate(request)
    return np.stack([np.asarray(image, dtype=np.float64) for image in result.images])


def test_the_folder_lists_sdxl_embeddings_and_says_why_others_are_not(folder: Path) -> None:
    usable, unusable = EmbeddingFolder(folder).scan()
    assert [(e.name, e.vectors, e.widths) for e in usable] == [("neg/blurry-ti", 1, WIDTHS), ("tinyemb", 2, WIDTHS)]
    assert "SD 1.x, not SDXL" in unusable["sd15-style"] and "SD 1.x, not SDXL" in unusable["old"]
    used = EmbeddingFolder(folder).used_by("a tinyemb house, tinyembs, (tinyemb:1.2)", "neg/blurry-ti")
    assert [e.name for e in used] == ["neg/blurry-ti", "tinyemb"]
    assert EmbeddingFolder(folder).used_by("tinyembs and xtinyemb") == []  # inside other words: not the name


async def test_an_embedding_gives_what_diffusers_load_textual_inversion_gives(
    with_folder: ImageService, tiny_pair: tuple[Path, Path], folder: Path
) -> None:
    prompt = f"{PROMPT}, tinyemb"
    request = _request(prompt=prompt)
    ours = await _pixels(with_folder, request)
    hand = HandDriven(*tiny_pair)  # its own pipelines: loading an embedding changes them for good
    vectors = _vectors(2, 1)
    hand.base.load_textual_inversion(vectors["clip_l"], token="tinyemb", text_encoder=hand.base.text_encoder,
                                     tokenizer=hand.base.tokenizer)  # fmt: skip
    for pipe in (hand.base, hand.refiner):  # OpenCLIP's vectors for the base's second encoder and the refiner's
        pipe.load_textual_inversion(vectors["clip_g"], token="tinyemb", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)  # fmt: skip
    expected = hand.render(request, [7], prompt=prompt)
    assert np.abs(ours - expected).max() <= 2.0
    plain_words = await _pixels(with_folder, _request(prompt=f"{PROMPT}, tiny emb"))
    assert np.abs(ours - plain_words).max() > 10  # the vectors, not the word's letters, made the image


async def test_with_without_with_leaves_no_residue_and_the_png_records_ti_hashes(with_folder: ImageService) -> None:
    before = await _pixels(with_folder, _request(seed=11))
    result = await with_folder.generate(_request(seed=11, prompt=f"{PROMPT}, tinyemb", negative_prompt="neg/blurry-ti"))
    after = await _pixels(with_folder, _request(seed=11))
    assert np.array_equal(before, after)  # the token tables and tokenizers are as they were
    names = [embedding["name"] for embedding in result.embeddings]
    assert names == ["neg/blurry-ti", "tinyemb"] and all(len(e["hash"]) == 12 for e in result.embeddings)
    text = a1111_parameters(result.metadata())
    assert (
        f'TI hashes: "neg/blurry-ti: {result.embeddings[0]["hash"]}, tinyemb: {result.embeddings[1]["hash"]}"' in text
    )


async def test_an_embedding_in_the_negative_prompt_changes_the_image(with_folder: ImageService) -> None:
    plain = await _pixels(with_folder, _request(negative_prompt="blurry"))
    negative = await _pixels(with_folder, _request(negative_prompt="blurry, neg/blurry-ti"))
    assert np.abs(plain - negative).max() > 10


async def test_an_embedding_for_other_widths_fails_the_run_naming_it(
    service: ImageService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxl_refinery.errors import InvalidRequest

    save_file(_vectors(1, 3, widths=(768, 1280)), str(tmp_path / "full-size.safetensors"))  # SDXL's own widths
    monkeypatch.setattr(service, "embedding_folder", EmbeddingFolder(tmp_path))
    with pytest.raises(InvalidRequest, match="full-size: clip_l is 768 wide; this model's text encoder takes 32"):
        await service.generate(_request(prompt=f"{PROMPT}, full-size"))
    assert np.array_equal(await _pixels(service, _request(seed=5)), await _pixels(service, _request(seed=5)))
