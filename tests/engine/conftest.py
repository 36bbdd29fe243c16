"""Engine test fixtures: diffusers driven by hand, loaded once per test module."""

from __future__ import annotations

from pathlib import Path

import pytest

from .hand_driven import HandDriven


@pytest.fixture(scope="module")
def hand(tiny_pair: tuple[Path, Path]) -> HandDriven:
    return HandDriven(*tiny_pair)
