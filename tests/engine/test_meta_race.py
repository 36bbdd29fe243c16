"""Models built while another thread's load leaves meta tensors are built again, and only those."""

from __future__ import annotations

import pytest
import torch

from sdxl_refinery.engine.meta_race import built_off_meta


class Failed(Exception):
    pass


def test_a_model_left_on_meta_is_built_again() -> None:
    made: list[torch.nn.Module] = []

    def build() -> torch.nn.Module:
        made.append(torch.nn.Linear(2, 2, device="meta" if len(made) < 2 else "cpu"))
        return made[-1]

    built = built_off_meta(build, lambda model: [model], Failed)
    assert len(made) == 3 and built is made[-1] and not built.weight.is_meta


def test_errors_over_meta_tensors_retry_and_others_pass_through() -> None:
    calls: list[int] = []

    def flaky() -> torch.nn.Module:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Tensor on device meta is not on the expected device cpu!")
        return torch.nn.Linear(1, 1)

    assert isinstance(built_off_meta(flaky, lambda model: [model], Failed), torch.nn.Linear) and len(calls) == 2

    def broken() -> torch.nn.Module:
        raise ValueError("size mismatch for weight")

    with pytest.raises(ValueError, match="size mismatch"):
        built_off_meta(broken, lambda model: [model], Failed)
    with pytest.raises(Failed, match="stayed on the meta device"):
        built_off_meta(lambda: torch.nn.Linear(1, 1, device="meta"), lambda model: [model], Failed)
