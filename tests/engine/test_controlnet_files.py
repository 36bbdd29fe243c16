"""Single-file ControlNets: a tiny SDXL ControlNet saved as one file, in diffusers' names and in the original
ControlNet names, lists as usable and guides the base exactly as the same model from a diffusers folder does;
Control-LoRAs, LLLite, T2I-Adapters and SD 1.5 files are listed unusable with the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file

from sdxl_refinery import GenerationRequest, ImageService
from sdxl_refinery.controlnets import ControlNetFolder
from sdxl_refinery.engine.controlnet_files import config_from_shapes, load_single_file
from sdxl_refinery.engine.sgm_keys import _UNET_RESNET, _rename, _unet_prefixes
from sdxl_refinery.errors import ModelLoadError

from .hand_driven import PROMPT
from .test_controlnet import SIZE, STEPS, _tiny_controlnet, _unit
from .test_edits import pixels


def original_names(controlnet: ControlNetModel, base_unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The ControlNet's tensors under the original ControlNet release's names (`control_model.` prefix), as
    lllyasviel's ControlNet code saves them; written here independently of diffusers' converter."""
    config = {**controlnet.config, "up_block_types": base_unet.config.up_block_types}
    plain, resnets = _unet_prefixes(config)
    hint_blocks = len(controlnet.controlnet_cond_embedding.blocks)
    plain.update({f"controlnet_cond_embedding.blocks.{index}.": f"input_hint_block.{2 * (index + 1)}."
                  for index in range(hint_blocks)})  # fmt: skip
    plain.update({"controlnet_cond_embedding.conv_in.": "input_hint_block.0.",
                  "controlnet_cond_embedding.conv_out.": f"input_hint_block.{2 * (hint_blocks + 1)}.",
                  "controlnet_mid_block.": "middle_block_out.0."})  # fmt: skip
    plain.update({f"controlnet_down_blocks.{index}.": f"zero_convs.{index}.0."
                  for index in range(len(controlnet.controlnet_down_blocks))})  # fmt: skip
    renamed = {}
    for key, tensor in controlnet.state_dict().items():
        new = _rename(key, resnets, _UNET_RESNET) or _rename(key, plain)
        assert new is not None, key
        renamed["control_model." + new] = tensor.contiguous()
    return renamed


@pytest.fixture(scope="module")
def files(tiny_pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("controlnet-files")
    _tiny_controlnet(tiny_pair[0], 1).save_pretrained(root / "tiny-canny")
    model = _tiny_controlnet(tiny_pair[0], 1)
    own_names = {key: tensor.contiguous() for key, tensor in model.state_dict().items()}
    save_file(own_names, root / "as-diffusers.safetensors")
    base_unet = UNet2DConditionModel.from_pretrained(tiny_pair[0] / "unet")
    save_file(original_names(model, base_unet), root / "as-original.safetensors")
    control_lora = {"lora_controlnet": torch.zeros(1), "input_hint_block.0.weight": torch.zeros(2, 2)}
    save_file(control_lora, root / "control-lora.safetensors")
    save_file({"down_blocks.0.lllite_conditioning1.weight": torch.zeros(1)}, root / "lllite.safetensors")
    save_file({"adapter.body.0.resnets.0.block1.weight": torch.zeros(1)}, root / "t2i-adapter.safetensors")
    save_file({"input_hint_block.0.weight": torch.zeros(1), "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight":
               torch.zeros(320, 768)}, root / "sd15.safetensors")  # fmt: skip
    save_file({"conv_in.weight": torch.zeros(1)}, root / "unet-part.safetensors")
    return root


def test_single_files_are_classified_from_their_headers(files: Path) -> None:
    entries = {entry.name: entry for entry in ControlNetFolder(files).entries(context_width=80)}
    assert entries["as-diffusers"].reason is None and entries["as-original"].reason is None
    assert "Control-LoRA" in str(entries["control-lora"].reason)
    assert "LLLite" in str(entries["lllite"].reason)
    assert "T2I-Adapter" in str(entries["t2i-adapter"].reason)
    assert "made for SD 1.x" in str(entries["sd15"].reason)
    assert "not a ControlNet" in str(entries["unet-part"].reason)


def test_the_architecture_read_from_shapes_is_the_models_own(tiny_pair: tuple[Path, Path], files: Path) -> None:
    model = ControlNetModel.from_pretrained(files / "tiny-canny")
    base = UNet2DConditionModel.from_pretrained(tiny_pair[0] / "unet").config
    config = config_from_shapes({key: tuple(value.shape) for key, value in model.state_dict().items()}, base)
    for key, value in config.items():
        own = model.config[key]
        assert (list(own) if isinstance(own, (list, tuple)) else own) == value, key


@pytest.mark.parametrize("name", ["as-diffusers", "as-original"])
async def test_a_single_file_guides_the_base_as_its_folder_does(service: ImageService, files: Path, name: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(service, "controlnet_folder", ControlNetFolder(files))
    unit: dict[str, Any] = _unit(weight=0.8)
    from_folder = await service.generate(GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[unit]))
    from_file = await service.generate(
        GenerationRequest(prompt=PROMPT, **SIZE, **STEPS, controlnets=[{**unit, "model": name}])
    )
    assert np.array_equal(pixels(from_file.images), pixels(from_folder.images))


def test_a_file_whose_tensors_do_not_fit_is_refused_naming_them(tiny_pair: tuple[Path, Path], files: Path,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    from safetensors.torch import load_file

    state = load_file(files / "as-diffusers.safetensors")
    del state["controlnet_mid_block.weight"]
    save_file(state, tmp_path / "broken.safetensors")
    base = UNet2DConditionModel.from_pretrained(tiny_pair[0] / "unet").config
    with pytest.raises(ModelLoadError, match="controlnet_mid_block.weight"):
        load_single_file(tmp_path / "broken.safetensors", base)
