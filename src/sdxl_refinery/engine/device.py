"""Device and precision policy: which device runs, in which precision, and why.

CUDA, then Apple MPS, then CPU. Precision `auto` picks fp16 on CUDA (with the
VAE decoding in fp32, since SDXL's VAE overflows in fp16 and gives black or NaN
images), bf16 on CPUs with native bf16 instructions (avx512_bf16 or AMX), and
fp32 everywhere else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import Precision, validate_device, validate_precision

log = logging.getLogger(__name__)

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_POLICY_OF_DTYPE = {torch.float32: Precision.FULL, torch.float16: Precision.HALF, torch.bfloat16: Precision.BF16}


@dataclass(frozen=True)
class Placement:
    """Where and how the models run.

    Attributes:
        device: torch device string, e.g. `cpu`, `cuda:0`.
        dtype: dtype of the UNets and text encoders.
        vae_dtype: dtype the VAE decodes in.
        reason: why the policy chose this, for logs and `refinery doctor`.
        precision: the policy this placement carries out (`full`, `half` or `bf16`; never `auto`), recorded so
            that a run can be repeated with the same policy; `precision_name` is for display only.
    """

    device: str
    dtype: torch.dtype
    vae_dtype: torch.dtype
    reason: str

    @property
    def precision(self) -> Precision:
        return _POLICY_OF_DTYPE[self.dtype]

    @property
    def precision_name(self) -> str:
        """Short name recorded in results: `fp32`, `fp16`, `bf16`, or `fp16+fp32-vae`."""
        name = _DTYPE_NAMES[self.dtype]
        if self.vae_dtype != self.dtype:
            name += f"+{_DTYPE_NAMES[self.vae_dtype]}-vae"
        return name


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 natively (avx512_bf16 or AMX)."""
    try:
        flags = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in _NATIVE_BF16_FLAGS)


def choose_device(requested: str = "auto") -> str:
    """Pick the device: `requested` unless `auto`, else CUDA, then MPS, then CPU.

    Raises:
        InvalidRequest: `requested` is not a device name, or names a device this
            machine does not have.
    """
    from ..errors import InvalidRequest

    validate_device(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda:0"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequest("device", f"{requested} was asked for but CUDA is not available here")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequest("device", "mps was asked for but Apple MPS is not available here")
    if requested == "cuda":
        return "cuda:0"
    return requested


def choose_placement(
    device: str = "auto", precision: Precision | str = Precision.AUTO, native_bf16: bool | None = None
) -> Placement:
    """Apply the device and precision policy.

    Args:
        device: `auto` or a device name.
        precision: `auto`, `full`, `half` or `bf16`.
        native_bf16: override CPU bf16 detection (tests).

    Raises:
        InvalidRequest: unknown device or precision, or a device that is absent.
    """
    chosen = choose_device(device)
    policy = validate_precision(precision)
    kind = chosen.split(":")[0]
    if policy is Precision.FULL:
        return Placement(chosen, torch.float32, torch.float32, "precision=full forces fp32")
    if policy is Precision.HALF:
        vae = torch.float32 if kind == "cuda" else torch.float16
        return Placement(chosen, torch.float16, vae, "precision=half forces fp16 (VAE decodes in fp32 on CUDA)")
    if policy is Precision.BF16:
        return Placement(chosen, torch.bfloat16, torch.bfloat16, "precision=bf16 forces bf16")
    if kind == "cuda":
        return Placement(chosen, torch.float16, torch.float32, "CUDA: fp16 weights, VAE decodes in fp32 to avoid NaN")
    if kind == "cpu":
        if cpu_has_native_bf16() if native_bf16 is None else native_bf16:
            return Placement(chosen, torch.bfloat16, torch.bfloat16, "CPU with native bf16 (avx512_bf16/AMX): bf16")
        return Placement(chosen, torch.float32, torch.float32, "CPU without native bf16: fp32")
    return Placement(chosen, torch.float32, torch.float32, f"{kind}: fp32")
