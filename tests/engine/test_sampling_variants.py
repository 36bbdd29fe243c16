"""v-prediction and zero-terminal-SNR fine-tunes, read from their keys or a sidecar, sampled as diffusers samples
them when told (`prediction_type`, `rescale_betas_zero_snr`, trailing timesteps, guidance rescale)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.engine.export import export_to_single_file
from sdxl_refinery.engine.single_file import inspect_checkpoint
from sdxl_refinery.errors import InvalidRequest, ModelLoadError

PROMPT = "a lighthouse at dusk"
REQUEST: dict[str, Any] = {"prompt": PROMPT, "width": 64, "height": 64, "num_inference_steps": 6,
                           "refiner_steps": 2, "seed": 21}  # fmt: skip


@pytest.fixture(scope="module")
def base_file(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("variants") / "base.safetensors"
    export_to_single_file(tiny_pair[0], path)
    return path


def marked(base_file: Path, folder: Path, marks: list[str]) -> Path:
    """The base file with NoobAI-XL's empty marker tensors added."""
    with safe_open(str(base_file), "pt") as source:
        metadata = source.metadata()
    path = folder / f"{'-'.join(marks)}.safetensors"
    save_file({**load_file(base_file), **{mark: torch.zeros(0) for mark in marks}}, path, metadata=metadata)
    return path


def by_hand(tiny_pair: tuple[Path, Path], **scheduler: Any) -> np.ndarray:
    base = StableDiffusionXLPipeline.from_pretrained(tiny_pair[0])
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_pair[1], text_encoder_2=base.text_encoder_2,
                                                               vae=base.vae)  # fmt: skip
    rescale = 0.7 if scheduler.get("rescale_betas_zero_snr") else 0.0
    base.scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, **scheduler)
    generator = [torch.Generator("cpu").manual_seed(21)]
    latents = base(prompt=PROMPT, width=64, height=64, num_inference_steps=6, guidance_scale=8.0,
                   guidance_rescale=rescale, generator=generator, output_type="latent").images  # fmt: skip
    image = refiner(prompt=PROMPT, image=latents, strength=0.3, num_inference_steps=7, guidance_scale=8.0,
                    generator=generator, output_type="np").images  # fmt: skip
    return np.asarray(image[0]) * 255


async def render(path: Path, refiner: Path, **fields: Any) -> np.ndarray:
    service = ImageService(str(path), str(refiner), device="cpu", precision="full")
    try:
        result = await service.generate(GenerationRequest(**REQUEST, **fields))
        return np.asarray(result.images[0], dtype=np.float64)
    finally:
        service.close()


@pytest.mark.parametrize(
    ("marks", "scheduler"),
    [(["v_pred"], {"prediction_type": "v_prediction"}),
     (["v_pred", "ztsnr"], {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                            "timestep_spacing": "trailing"})],
)  # fmt: skip
async def test_a_marked_file_equals_diffusers_told_its_sampling(
    base_file: Path, tiny_pair: tuple[Path, Path], tmp_path: Path, marks: list[str], scheduler: dict[str, Any]
) -> None:
    path = marked(base_file, tmp_path, marks)
    info = inspect_checkpoint(path)
    assert info.sampling.prediction_type == "v_prediction" and info.sampling.source == "keys"
    ours = await render(path, tiny_pair[1])
    assert np.abs(ours - by_hand(tiny_pair, **scheduler)).max() <= 2.0
    as_epsilon = by_hand(tiny_pair)  # what reading it as SDXL 1.0 gives: another image
    assert np.abs(ours - as_epsilon).mean() > 5


async def test_a_sidecar_sets_the_sampling_of_an_unmarked_file(
    base_file: Path, tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    path = tmp_path / "plain.safetensors"
    path.write_bytes(base_file.read_bytes())
    (tmp_path / "plain.sampling.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert inspect_checkpoint(path).sampling.source.endswith("plain.sampling.json")
    ours = await render(path, tiny_pair[1])
    assert np.abs(ours - by_hand(tiny_pair, prediction_type="v_prediction")).max() <= 2.0
    (tmp_path / "plain.sampling.json").write_text(json.dumps({"prediction_type": "x0"}))
    with pytest.raises(ModelLoadError, match="prediction_type must be one of epsilon, v_prediction"):
        inspect_checkpoint(path)


async def test_a_sampler_diffusers_cannot_tell_is_refused_naming_it(
    base_file: Path, tiny_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    path = marked(base_file, tmp_path, ["v_pred", "ztsnr"])
    with pytest.raises(InvalidRequest) as caught:
        await render(path, tiny_pair[1], sampler="LMS")
    assert caught.value.field == "sampler" and "rescale_betas_zero_snr" in caught.value.rule
