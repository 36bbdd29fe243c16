"""The device and precision policy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdxl_refinery import InvalidRequest
from sdxl_refinery.engine.device import choose_placement, cpu_has_native_bf16


def test_cpu_with_native_bf16_gets_bf16() -> None:
    placement = choose_placement("cpu", "auto", native_bf16=True)
    assert (placement.dtype, placement.vae_dtype, placement.precision_name) == (torch.bfloat16, torch.bfloat16, "bf16")
    assert "avx512_bf16" in placement.reason


def test_cpu_without_native_bf16_gets_fp32() -> None:
    assert choose_placement("cpu", "auto", native_bf16=False).dtype == torch.float32


@pytest.mark.parametrize(
    ("precision", "dtype"), [("full", torch.float32), ("half", torch.float16), ("bf16", torch.bfloat16)]
)
def test_forced_precisions(precision: str, dtype: torch.dtype) -> None:
    assert choose_placement("cpu", precision).dtype == dtype


def test_absent_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidRequest, match="device: cuda:1 was asked for but CUDA is not available"):
        choose_placement("cuda:1")


def test_cuda_auto_is_fp16_with_fp32_vae(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    placement = choose_placement("auto", "auto")
    assert (placement.device, placement.dtype, placement.vae_dtype) == ("cuda:0", torch.float16, torch.float32)
    assert placement.precision_name == "fp16+fp32-vae"


def test_auto_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert choose_placement("auto", "full").device == "cpu"


def test_bf16_flag_detection(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu sse avx2\n")
    assert not cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_fp16_variant_files_are_used_when_present_and_precision_allows(tmp_path: Path) -> None:
    from sdxl_refinery.engine.loader import _variant
    from sdxl_refinery.engine.sources import ModelSource, SourceKind

    (tmp_path / "unet").mkdir()
    source = ModelSource(SourceKind.FOLDER, str(tmp_path), "x")
    half = choose_placement("cpu", "half")
    assert _variant(source, half) is None
    (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert _variant(source, half) == "fp16"
    assert _variant(source, choose_placement("cpu", "full")) is None
