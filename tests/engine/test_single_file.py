"""Single-file checkpoints: offline round trip, shipped configs, refusals."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from sdxl_refinery import GenerationRequest, ImageService, ModelLoadError
from sdxl_refinery.engine.export import export_to_single_file
from sdxl_refinery.engine.single_file import inspect_checkpoint, shipped_config


@pytest.fixture(scope="module")
def single_files(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("single")
    base, refiner = folder / "tiny_base.safetensors", folder / "tiny_refiner.safetensors"
    assert export_to_single_file(tiny_pair[0], base) == "sdxl-base"
    assert export_to_single_file(tiny_pair[1], refiner) == "sdxl-refiner"
    return base, refiner


async def test_single_files_load_offline_and_render_identical_images(
    single_files: tuple[Path, Path], service: ImageService, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub-cache"))  # nothing cached to fall back on
    from_files = ImageService(str(single_files[0]), str(single_files[1]), device="cpu", precision="full")
    request = GenerationRequest(prompt="a windmill", width=256, height=256, num_inference_steps=6, refiner_steps=3,
                                seed=21, n=2)  # fmt: skip
    try:
        ours = await from_files.generate(request)
    finally:
        from_files.close()
    reference = await service.generate(request)
    # Weights round-trip bit for bit; the pooled text embedding differs by ~2e-7 (float rounding in a
    # differently allocated copy), which can move a rare pixel by one level.
    for a, b in zip(ours.images, reference.images, strict=True):
        difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert difference.max() <= 1 and (difference > 0).mean() < 0.001
    assert ours.models["base_source"] == f"file:{single_files[0]}"
    assert len(ours.models["base_hash"]) == 10 and ours.models["base_hash"] != ours.models["refiner_hash"]


def test_shipped_base_config_builds_the_real_unet_on_meta() -> None:
    config = shipped_config("sdxl-base")
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    assert next(unet.parameters()).device.type == "meta"
    refiner = shipped_config("sdxl-refiner")
    assert refiner["unet"]["projection_class_embeddings_input_dim"] == 5 * 256 + 1280
    assert refiner["unet"]["cross_attention_dim"] == config["text_encoder_2"]["hidden_size"]


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_sd15_checkpoint_is_refused_with_what_it_is(tmp_path: Path) -> None:
    path = _write(tmp_path / "v1-5.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 8),
    })  # fmt: skip
    with pytest.raises(ModelLoadError, match="Stable Diffusion 1.x/2.x checkpoint"):
        inspect_checkpoint(path)


@pytest.mark.parametrize(
    ("keys", "what"),
    [
        (["lora_unet_down_blocks_0.lora_down.weight"], "a LoRA"),
        (["encoder.conv_in.weight", "decoder.conv_out.weight"], "a VAE alone"),
        (["something.else"], "an unknown model"),
    ],
)
def test_foreign_files_are_refused(tmp_path: Path, keys: list[str], what: str) -> None:
    path = _write(tmp_path / "x.safetensors", {key: torch.zeros(2) for key in keys})
    with pytest.raises(ModelLoadError, match=f"not an SDXL base or refiner checkpoint: found {what}"):
        inspect_checkpoint(path)


def test_truncated_file_is_refused(single_files: tuple[Path, Path], tmp_path: Path) -> None:
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(single_files[0].read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="truncated"):
        inspect_checkpoint(truncated)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="truncated or empty"):
        inspect_checkpoint(tmp_path / "empty.safetensors")


def test_wrong_file_types_and_missing_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match="pickle checkpoints .* can run arbitrary code"):
        inspect_checkpoint(tmp_path / "model.ckpt")
    (tmp_path / "notes.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        inspect_checkpoint(tmp_path / "notes.safetensors")
    with pytest.raises(ModelLoadError, match="no such file"):
        inspect_checkpoint(tmp_path / "missing.safetensors")


async def test_base_file_given_as_refiner_is_refused(single_files: tuple[Path, Path]) -> None:
    service = ImageService(str(single_files[0]), str(single_files[0]), device="cpu")
    with pytest.raises(ModelLoadError, match="is an sdxl-base checkpoint, expected sdxl-refiner"):
        await service.load()
    service.close()


def test_export_embeds_configs_for_offline_loading(single_files: tuple[Path, Path]) -> None:
    info = inspect_checkpoint(single_files[1])
    assert info.kind == "sdxl-refiner"
    assert info.config["unet"]["cross_attention_dim"] == 48
    assert json.loads(json.dumps(info.config))["model_index"]["requires_aesthetics_score"] is True


async def test_a_checkpoint_missing_a_tensor_is_refused_at_load_naming_it(
    single_files: tuple[Path, Path], tmp_path: Path
) -> None:
    """diffusers met a missing tensor as "Cannot copy out of meta tensor"; loading now checks the file the way
    `refinery models verify` does and names the tensor, before any weights load."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(single_files[0]), "pt") as source:
        metadata = source.metadata()
    tensors = load_file(single_files[0])
    dropped = next(key for key in sorted(tensors) if key.startswith("model.diffusion_model.output_blocks"))
    del tensors[dropped]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, broken, metadata=metadata)
    service = ImageService(str(broken), str(single_files[1]), device="cpu", precision="full")
    try:
        with pytest.raises(ModelLoadError) as caught:
            await service.load()
    finally:
        service.close()
    assert f"base model {broken}: incomplete or damaged checkpoint: missing tensor {dropped}" in str(caught.value)
