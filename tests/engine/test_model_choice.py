"""Checkpoints chosen per request from the models folder: each image is that model's, driven by hand; loaded
pairs stay within their bound; a refiner with its own text encoder 2 uses it."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModelWithProjection

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine.catalog import ModelFolder
from sdxl_refinery.engine.export import export_to_single_file
from sdxl_refinery.errors import InvalidRequest

PROMPT = "a lighthouse on a cliff"
REQUEST: dict[str, Any] = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 4,
                           "refiner_steps": 2, "seed": 5}  # fmt: skip


def reseeded_base(source: Path, target: Path, seed: int) -> Path:
    """The tiny base with another UNet (its own random weights): a fine-tune, as far as tests can tell."""
    pipe = StableDiffusionXLPipeline.from_pretrained(source)
    torch.manual_seed(seed)
    pipe.register_modules(unet=UNet2DConditionModel.from_config(pipe.unet.config))
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def models_folder(tiny_pair: tuple[Path, Path], root: Path) -> dict[str, Path]:
    """beta: a base as a single file; gamma: a base as a diffusers folder; refiner-x: a refiner with its own
    text encoder 2; notes/lora.safetensors: not a checkpoint."""
    folder = root / "models"
    folder.mkdir()
    beta = reseeded_base(tiny_pair[0], root / "beta-folder", 7)
    export_to_single_file(beta, folder / "beta.safetensors")
    gamma = reseeded_base(tiny_pair[0], folder / "gamma", 8)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_pair[1])
    torch.manual_seed(9)
    refiner.register_modules(text_encoder_2=CLIPTextModelWithProjection(refiner.text_encoder_2.config))
    refiner.save_pretrained(folder / "refiner-x", safe_serialization=True)
    (folder / "notes").mkdir()
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, folder / "notes" / "lora.safetensors")
    return {"folder": folder, "beta": beta, "gamma": gamma, "refiner-x": folder / "refiner-x"}


@pytest.fixture(scope="module")
def models(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return models_folder(tiny_pair, tmp_path_factory.mktemp("choice"))


def by_hand(
    base_dir: Path, refiner_dir: Path, share: bool = True, schedule: tuple[int, float] = (7, 0.3)
) -> np.ndarray:
    base = StableDiffusionXLPipeline.from_pretrained(base_dir)
    shared = {"text_encoder_2": base.text_encoder_2, "vae": base.vae} if share else {"vae": base.vae}
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir, **shared)
    generator = [torch.Generator("cpu").manual_seed(5)]
    latents = base(prompt=PROMPT, width=64, height=64, num_inference_steps=4, guidance_scale=8.0,
                   generator=generator, output_type="latent").images  # fmt: skip
    image = refiner(prompt=PROMPT, image=latents, strength=schedule[1], num_inference_steps=schedule[0],
                    guidance_scale=8.0, generator=generator, output_type="np").images[0]  # fmt: skip
    return np.asarray(image) * 255


@contextlib.contextmanager
def tiny_service(tiny_pair: tuple[Path, Path], **options: Any) -> Iterator[ImageService]:
    """An fp32 CPU service over the tiny pair (its own, not the session's), closed after."""
    service = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", precision="full", **options)
    try:
        yield service
    finally:
        service.close()


def pixels(result: Any) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.float64)


def test_the_folder_is_classified_from_headers_and_configs(models: dict[str, Path]) -> None:
    entries, unusable = ModelFolder(models["folder"]).scan()
    found = {entry.name: (entry.role, entry.layout) for entry in entries}
    assert found == {"beta": ("base", "single file"), "gamma": ("base", "diffusers folder"),
                     "refiner-x": ("refiner", "diffusers folder")}  # fmt: skip
    assert [(item.name, "LoRA" in item.reason) for item in unusable] == [("notes/lora", True)]
    beta = ModelFolder(models["folder"]).find("beta")
    assert beta is not None and beta.hash and ModelFolder(models["folder"]).find(beta.title) == beta


async def test_each_request_gets_its_checkpoint_and_the_cache_keeps_its_bound(
    tiny_pair: tuple[Path, Path], models: dict[str, Path]
) -> None:
    with tiny_service(tiny_pair, models_dir=models["folder"], max_loaded_pairs=1) as service:
        default = await service.generate(GenerationRequest(**REQUEST))
        beta = await service.generate(GenerationRequest(**REQUEST, base_model="beta"))
        assert np.abs(pixels(beta) - by_hand(models["beta"], tiny_pair[1])).max() <= 2.0
        assert np.abs(pixels(beta) - pixels(default)).mean() > 5  # another model, another image
        assert beta.models["base"] == "beta" and beta.models["base_hash"]
        assert "load" in beta.timings and len(service.loaded_pairs) == 1  # switching is timed; one pair resident
        again = await service.generate(GenerationRequest(**REQUEST, base_model="beta"))
        assert "load" not in again.timings and np.array_equal(pixels(again), pixels(beta))
        gamma = await service.generate(GenerationRequest(**REQUEST, base_model="gamma"))
        assert np.abs(pixels(gamma) - by_hand(models["gamma"], tiny_pair[1])).max() <= 2.0
        assert service.loaded_pairs == [(str(models["gamma"]), str(tiny_pair[1]))]
        back = await service.generate(GenerationRequest(**REQUEST))  # the service's own pair, loaded again
        assert np.array_equal(pixels(back), pixels(default))


async def test_two_pairs_stay_loaded_when_allowed_and_the_oldest_is_released(
    tiny_pair: tuple[Path, Path], models: dict[str, Path]
) -> None:
    with tiny_service(tiny_pair, models_dir=models["folder"], max_loaded_pairs=2) as service:
        for name in ("beta", "gamma", None, "beta"):
            await service.generate(GenerationRequest(**REQUEST, base_model=name))
            assert len(service.loaded_pairs) <= 2
        assert [pair[0] for pair in service.loaded_pairs] == [
            str(tiny_pair[0]),
            str(models["folder"] / "beta.safetensors"),
        ]


async def test_a_refiner_with_its_own_text_encoder_2_uses_it(
    tiny_pair: tuple[Path, Path], models: dict[str, Path]
) -> None:
    with tiny_service(tiny_pair, models_dir=models["folder"]) as service:
        # The refiner redraws most of the image here, so its prompt encoding shows.
        fields = {**REQUEST, "refiner_steps": 6, "refiner_strength": 0.9}
        own = await service.generate(GenerationRequest(**fields, refiner_model="refiner-x"))
        expected = by_hand(tiny_pair[0], models["refiner-x"], share=False, schedule=(7, 0.9))
        assert np.abs(pixels(own) - expected).max() <= 2.0
        shared = by_hand(tiny_pair[0], models["refiner-x"], share=True, schedule=(7, 0.9))  # the base's encoder
        assert np.abs(pixels(own) - shared).max() > 10
        engine: Any = service._engine
        assert engine.pair.refiner.text_encoder_2 is not engine.pair.base.text_encoder_2
        assert engine.pair.refiner.vae is engine.pair.base.vae  # identical: one copy


def test_names_are_checked_before_any_work(tiny_pair: tuple[Path, Path], models: dict[str, Path]) -> None:
    service = ImageService(str(tiny_pair[0]), str(tiny_pair[1]), device="cpu", models_dir=models["folder"])
    cases = [({"base_model": "delta"}, "base_model", "known: beta, gamma"),
             ({"base_model": "refiner-x"}, "base_model", "is a refiner checkpoint"),
             ({"refiner_model": "beta"}, "refiner_model", "is a base checkpoint"),
             ({"base_model": "/etc/passwd"}, "base_model", "no model")]  # fmt: skip
    for fields, field, words in cases:
        with pytest.raises(InvalidRequest) as caught:
            service.resolve_models(GenerationRequest(**REQUEST, **fields), allow_paths=False)
        assert caught.value.field == field and words in caught.value.rule
    service.close()


def test_an_inpainting_file_and_an_fp16_bf16_mix_load_from_the_folder(
    tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    """A 9-channel SDXL inpainting single file is read as such (no transformers size-mismatch hint), and a file
    holding fp16 and bf16 tensors loads in the engine's precision."""
    import asyncio

    from PIL import Image, ImageDraw
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdxl_refinery.engine.tiny import tiny_inpainting_unet

    folder = tmp_path / "models"
    folder.mkdir()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    pipe.register_modules(unet=tiny_inpainting_unet())
    pipe.save_pretrained(tmp_path / "inpaint-folder", safe_serialization=True)
    export_to_single_file(tmp_path / "inpaint-folder", folder / "inpaint.safetensors")
    export_to_single_file(tiny_pair[0], tmp_path / "full.safetensors")
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as source:
        metadata = source.metadata()
    tensors = load_file(tmp_path / "full.safetensors")
    mixed = {key: tensor.to(torch.float16 if index % 2 else torch.bfloat16) for index, (key, tensor) in
             enumerate(sorted(tensors.items()))}  # fmt: skip
    save_file(mixed, folder / "mixed.safetensors", metadata=metadata)
    entries = {entry.name: entry.role for entry in ModelFolder(folder).scan()[0]}
    assert entries == {"inpaint": "inpainting", "mixed": "base"}

    with tiny_service(tiny_pair, models_dir=folder) as service:
        init = Image.new("RGB", (64, 64), (40, 120, 200))
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
        painted = asyncio.run(service.generate(GenerationRequest(**REQUEST, base_model="inpaint", init_image=init,
                                                                 mask_image=mask, mask_blur=0)))  # fmt: skip
        assert np.array_equal(np.asarray(painted.images[0])[:, 32:], np.asarray(init)[:, 32:])
        with pytest.raises(InvalidRequest, match="inpainting checkpoint"):
            asyncio.run(service.generate(GenerationRequest(**REQUEST, base_model="inpaint")))
        half = asyncio.run(service.generate(GenerationRequest(**REQUEST, base_model="mixed")))
        full = asyncio.run(service.generate(GenerationRequest(**REQUEST)))
        assert np.abs(pixels(half) - pixels(full)).mean() < 3  # the same model, its weights rounded to 16 bits


async def test_pairs_that_would_not_fit_beside_each_other_are_released_first(
    tiny_pair: tuple[Path, Path], models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Within the count, memory decides too: when the next pair's weights would not fit in free memory
    beside those loaded, the loaded ones are released before it loads."""
    from sdxl_refinery.engine import memory

    asked: list[tuple[str, str]] = []

    def no_room(base: str, refiner: str, device: str, precision: str) -> bool:
        asked.append((base, refiner))
        return False

    monkeypatch.setattr(memory, "room_for_pair", no_room)
    with tiny_service(tiny_pair, models_dir=models["folder"], max_loaded_pairs=3) as service:
        for name in ("beta", "gamma"):
            await service.generate(GenerationRequest(**REQUEST, base_model=name))
        assert service.loaded_pairs == [(str(models["gamma"]), str(tiny_pair[1]))]
        assert asked == [(str(models["gamma"]), str(tiny_pair[1]))]  # asked only when another pair was loaded


def test_the_tiny_pair_fits_in_this_machines_memory() -> None:
    from sdxl_refinery.engine.memory import room_for_pair

    assert room_for_pair("tiny", "tiny", "cpu", "full") is True


def test_a_scan_reads_a_header_again_only_when_the_file_changes(models: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from sdxl_refinery.engine import catalog

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models["folder"] / "beta.safetensors", folder / "beta.safetensors")
    reads: list[Path] = []
    real = catalog.inspect_checkpoint
    monkeypatch.setattr(catalog, "inspect_checkpoint", lambda path: reads.append(path) or real(path))
    scanner = ModelFolder(folder)
    for _ in range(3):
        assert [entry.sampling for entry in scanner.scan()[0]] == ["epsilon"]
    assert len(reads) == 1
    (folder / "beta.sampling.json").write_text('{"prediction_type": "v_prediction"}')  # a sidecar changes it
    assert [entry.sampling for entry in scanner.scan()[0]] == ["v-prediction"]


async def test_a_refiner_with_its_own_vae_decodes_its_images(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """The image is decoded by the VAE of the last stage that ran: the refiner's own when it has one."""
    from diffusers import AutoencoderKL

    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_pair[1])
    torch.manual_seed(11)
    refiner.register_modules(vae=AutoencoderKL.from_config(refiner.vae.config))
    folder = tmp_path / "models"
    refiner.save_pretrained(folder / "refiner-v", safe_serialization=True)
    with tiny_service(tiny_pair, models_dir=folder) as service:
        ours = await service.generate(GenerationRequest(**REQUEST, refiner_model="refiner-v"))
        base = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
        shared = {"text_encoder_2": base.text_encoder_2}
        hand = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder / "refiner-v", **shared)
        generator = [torch.Generator("cpu").manual_seed(5)]
        latents = base(prompt=PROMPT, width=64, height=64, num_inference_steps=4, guidance_scale=8.0,
                       generator=generator, output_type="latent").images  # fmt: skip
        image = hand(prompt=PROMPT, image=latents, strength=0.3, num_inference_steps=7, guidance_scale=8.0,
                     generator=generator, output_type="np").images[0]  # fmt: skip
        assert np.abs(pixels(ours) - np.asarray(image) * 255).max() <= 2.0
        engine: Any = service._engine
        assert engine.pair.refiner.vae is not engine.pair.base.vae
        assert engine.pair.refiner.text_encoder_2 is engine.pair.base.text_encoder_2  # identical: shared
