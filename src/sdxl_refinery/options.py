"""How a service runs, as opposed to what it renders: device, precision and speed options.

On the ground floor so that `Settings` can hold these as validated types; the
request re-exports them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import InvalidRequest


class Precision(str, Enum):
    """Numeric precision policy of the models."""

    AUTO = "auto"
    FULL = "full"  # fp32
    HALF = "half"  # fp16
    BF16 = "bf16"


class Toggle(str, Enum):
    """A speed option: the measured policy (`auto`), or forced on or off."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def validate_device(device: str) -> str:
    """Return `device` if it names a device Refinery knows.

    Raises:
        InvalidRequest: for anything but auto, cpu, mps, cuda or cuda:N.
    """
    if not isinstance(device, str) or not _DEVICE_PATTERN.match(device):
        raise InvalidRequest("device", f"must be auto, cpu, mps, cuda or cuda:N, not {device!r}")
    return device


def validate_precision(precision: str) -> Precision:
    """Return the `Precision` named by `precision`.

    Raises:
        InvalidRequest: for anything but auto, full, half or bf16.
    """
    try:
        return Precision(precision)
    except ValueError:
        allowed = ", ".join(p.value for p in Precision)
        raise InvalidRequest("precision", f"must be one of {allowed}, not {precision!r}") from None


def validate_toggle(field_name: str, value: str) -> Toggle:
    """Return the `Toggle` named by `value`.

    Raises:
        InvalidRequest: naming `field_name`, for anything but auto, on or off.
    """
    try:
        return Toggle(value)
    except ValueError:
        raise InvalidRequest(field_name, f"must be one of auto, on, off, not {value!r}") from None


@dataclass(frozen=True)
class SpeedOptions:
    """What was asked for: `auto`, `on` or `off` each; `threads` 0 means one per usable CPU.

    Raises:
        InvalidRequest: a toggle that is not `auto`, `on` or `off`, or negative threads.
    """

    compile: str = "auto"
    channels_last: str = "auto"
    fused_qkv: str = "auto"
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("compile", "channels_last", "fused_qkv"):
            validate_toggle(name, getattr(self, name))
        if self.threads < 0:
            raise InvalidRequest("threads", f"must be 0 (one per usable CPU) or more, got {self.threads}")
