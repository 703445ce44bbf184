"""Fixtures the integration tests share."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def fake_gpu() -> Iterator[Any]:
    """The CUDA endpoint without a GPU: tests/gpu's fake CuPy (its device memory is host memory, so the
    endpoint's torch device is the CPU) with `cryptography` in place of the kernels; the endpoint's own code
    -- batch tables, flags, the gate, pinned copies, DLPack views -- runs as on a GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gpu"))
    import gpu_fake_cupy

    with gpu_fake_cupy.installed(gpu_fake_cupy.make_module(fast=True)) as fake:
        yield fake
