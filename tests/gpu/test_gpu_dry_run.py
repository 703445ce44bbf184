"""The GPU-only kernel tests (test_gpu_cuda.py) run here too, on the CPU: every test function of that
module is called against the emulated CuPy (gpu_fake_cupy: the real aesgcm.cu compiled as host C++) with
its MiB shrunk to 4 KiB. So a typo, a wrong call or an API drift in a test that only a GPU machine runs
fails on every machine first, and `make gpu-check` spends its device time on what only a GPU can show.

(test_gpu_endpoint.py needs a real daemon process that opens CUDA IPC handles; its paths run in
test_gpu_endpoint_emulated.py through the real pipeline in this process.)
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from gpu_emu_runner import cxx_compiler

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler to build the emulator")

HERE = Path(__file__).resolve().parent
# Values for the parametrized arguments (the module's own lists hold sizes up to 256 MiB).
SMALL = {"n": [0, 17, 4096 + 3], "where": ["ct_first", "tag_last"], "bad": [0, 15]}


@pytest.fixture(scope="module")
def gpu_tests() -> Iterator[tuple[ModuleType, Any]]:
    import gpu_fake_cupy

    with gpu_fake_cupy.installed(gpu_fake_cupy.make_module()) as fake:
        spec = importlib.util.spec_from_file_location("gpu_cuda_tests_dry", HERE / "test_gpu_cuda.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.MIB = 4096  # type: ignore[attr-defined]
        mod.KIB = 256  # type: ignore[attr-defined]
        yield mod, fake


def _test_names() -> list[str]:
    source = (HERE / "test_gpu_cuda.py").read_text()
    return [line.split("(")[0][4:] for line in source.splitlines() if line.startswith("def test_")]


@pytest.mark.parametrize("name", _test_names())
def test_gpu_only_test_runs_on_the_emulator(gpu_tests: tuple[ModuleType, Any], name: str) -> None:
    mod, fake = gpu_tests
    assert mod.AVAILABLE, mod.REASON
    fn = getattr(mod, name)
    params = [p for p in inspect.signature(fn).parameters if p != "cp"]
    missing = [p for p in params if p not in SMALL]
    assert not missing, f"{name}: give SMALL values for {missing}"
    ran = 0
    for values in itertools.product(*(SMALL[p] for p in params)):
        kwargs = dict(zip(params, values, strict=True))
        if "cp" in inspect.signature(fn).parameters:
            kwargs["cp"] = fake
        try:
            fn(**kwargs)
            ran += 1
        except pytest.skip.Exception:
            pass
    assert ran, f"{name} skipped every combination"
