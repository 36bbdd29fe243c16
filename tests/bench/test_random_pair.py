"""bench/random_pair.py writes full-size SDXL folders with random weights that diffusers loads as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open
from transformers import CLIPTextModel, CLIPTokenizer

from sdxl_refinery.engine.single_file import shipped_config


def test_written_components_load_with_sdxl_shapes_in_the_asked_dtype(tmp_path: Path) -> None:
    # The two small components only: the UNets are the same code path at 5 GB each.
    subprocess.run([sys.executable, "bench/random_pair.py", "--out", str(tmp_path), "--dtype", "fp16", "--only",
                    "vae", "text_encoder"], check=True, capture_output=True, timeout=600)  # fmt: skip
    with safe_open(tmp_path / "base" / "vae" / "diffusion_pytorch_model.safetensors", "pt") as stored:
        assert {stored.get_slice(key).get_dtype() for key in stored.keys()} == {"F16"}  # noqa: SIM118  # fp16
    vae = AutoencoderKL.from_pretrained(tmp_path / "base" / "vae", torch_dtype=torch.float16)
    assert vae.config.latent_channels == shipped_config("sdxl-base")["vae"][
        "latent_channels"]  # fmt: skip
    assert 80e6 < sum(p.numel() for p in vae.parameters()) < 90e6  # SDXL's VAE: 83.7 M parameters
    encoder = CLIPTextModel.from_pretrained(tmp_path / "base" / "text_encoder")
    assert encoder.config.hidden_size == 768 and encoder.config.num_hidden_layers == 12
    assert float(vae.decoder.conv_out.weight.float().std()) > 0.01  # random, not zeros
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "base" / "tokenizer")
    assert tokenizer("a fox").input_ids[0] == tokenizer.bos_token_id
    assert (tmp_path / "refiner" / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "refiner" / "model_index.json").is_file() and not (
        tmp_path / "refiner" / "text_encoder"
    ).exists()
