"""Shared fixtures: the tiny pair is built once per test session and saved as diffusers folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "XDG_CACHE_HOME" not in os.environ:  # model-hash cache and friends: never the developer's own
    import tempfile

    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="refinery-test-cache-")

from sdxl_refinery import ImageService
from sdxl_refinery.engine.tiny import save_tiny_pair


def _one_core_per_test_worker() -> None:
    """Under pytest-xdist, pin each test process (and what it starts) to a core of its own.

    The engine uses one torch thread per usable CPU; two test processes each using both cores
    oversubscribe them, and spinning OpenMP threads make every step several times slower. Code that
    drives torch outside the engine (hand-driven diffusers, the benchmarks' baselines) gets one
    thread too: torch's own default counts the machine's cores, not the process's.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
        os.environ["OMP_NUM_THREADS"] = "1"  # the processes the tests start
        import torch

        torch.set_num_threads(1)


_one_core_per_test_worker()

SMALL = {"width": 256, "height": 256}


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny base and refiner as local diffusers folders."""
    return save_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def service(tiny_pair: tuple[Path, Path]) -> Iterator[ImageService]:
    """One fp32 CPU service over the tiny folders, loaded once for the session."""
    base, refiner = tiny_pair
    svc = ImageService(str(base), str(refiner), device="cpu", precision="full")
    yield svc
    svc.close()
