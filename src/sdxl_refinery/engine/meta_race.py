"""Models built while another thread loads one: accelerate's `init_empty_weights` (diffusers' loads, model
inventories) patches module construction for every thread while it runs, so a model built meanwhile in
another thread can keep tensors on the meta device (or fail moving them). Such a model is built again."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

BUILD_ATTEMPTS = 5
Built = TypeVar("Built")


def on_meta(modules: Iterable[torch.nn.Module]) -> bool:
    """Whether any parameter or buffer of `modules` is still on the meta device."""
    return any(tensor.is_meta for module in modules for tensor in itertools.chain(module.parameters(),
                                                                                   module.buffers()))  # fmt: skip


def built_off_meta(build: Callable[[], Built], modules: Callable[[Built], Iterable[torch.nn.Module]],
                   failed: Callable[[str], Exception]) -> Built:  # fmt: skip
    """`build()`, again (a few times, waiting a little longer each time) while it fails over meta tensors or
    gives `modules` holding some; errors that are not about meta tensors pass through.

    Raises:
        Exception: `failed(reason)` when every attempt met meta tensors.
    """
    reason = "its weights stayed on the meta device while other models were loading; try again"
    for attempt in range(BUILD_ATTEMPTS):
        try:
            built = build()
        except Exception as error:
            if "meta" not in str(error):
                raise
            reason = str(error)[:300]
        else:
            if not on_meta(modules(built)):
                return built
        time.sleep(0.05 * (attempt + 1))
    raise failed(reason)
