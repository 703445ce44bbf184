"""Make the GPU tests importable however pytest is invoked (the SDK lives under client/)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_CLIENT = _HERE.parents[1] / "client"

for _path in (str(_HERE), str(_CLIENT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture(scope="module")
def fake_cp() -> Iterator[Any]:
    """`aesgcm_cuda` on a fake `cupy` whose "device" arrays are host memory and whose kernels are the
    emulated aesgcm.cu (a test module that needs more, e.g. `cupy` importable by name, defines its own)."""
    import gpu_fake_cupy

    with gpu_fake_cupy.installed(gpu_fake_cupy.make_module(), by_name=False) as mod:
        yield mod
