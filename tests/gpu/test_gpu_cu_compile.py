"""aesgcm.cu compiles warning-free with the -D options the Python side passes: with nvcc (cubin for
Hopper, so ptxas runs too) and with NVRTC exactly as CuPy calls it. Neither needs a GPU."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pipellm_client.gpu import DEFAULT_PARAMS, GcmParams
from pipellm_client.gpu.aesgcm_cuda import CU_SOURCE_PATH, compile_options, cuda_source
from pipellm_client.gpu.params import KERNEL_NAMES

TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if Path(candidate).exists():
            return candidate
    return None


def _nvrtc() -> Any | None:
    """NVRTC through CuPy's bindings (loads libnvrtc; works without a GPU or a driver)."""
    try:
        nvrtc = importlib.import_module("cupy_backends.cuda.libs.nvrtc")
        nvrtc.getVersion()
    except Exception:
        return None
    return nvrtc


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (PATH, /usr/local/cuda/bin)")
@pytest.mark.parametrize(
    ("params", "mode"),
    [(DEFAULT_PARAMS, "-cubin"), (TINY, "--ptx")],
    ids=["default-sm_90a-cubin", "tiny-ptx"],
)
def test_nvcc_compiles_without_warnings(tmp_path: Path, params: GcmParams, mode: str) -> None:
    out = tmp_path / "aesgcm.out"
    cmd = [_nvcc() or "nvcc", "-arch=sm_90a", "-std=c++17", mode, "-Xptxas", "-v", *params.cuda_defines(),
           "-o", str(out), str(CU_SOURCE_PATH)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr.lower(), proc.stderr
    assert out.stat().st_size > 0
    if mode == "-cubin":
        for name in KERNEL_NAMES:
            assert f"'{name}'" in proc.stderr  # ptxas compiled every entry point


@pytest.mark.skipif(_nvrtc() is None, reason="NVRTC not available (cupy_backends / libnvrtc missing)")
def test_nvrtc_compiles_like_cupy() -> None:
    nvrtc = _nvrtc()
    assert nvrtc is not None
    supported = nvrtc.getSupportedArchs()
    arch = 90 if 90 in supported else max(supported)
    # What CuPy's RawModule adds to our options (cupy/cuda/compiler.py): -ftz, the device's arch,
    # device as default execution space and, with NVRTC >= 12.8, a precompiled header.
    options = [
        *compile_options(DEFAULT_PARAMS),
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
    ]
    if tuple(nvrtc.getVersion()) >= (12, 8):
        options.append("--pch")
    prog = nvrtc.createProgram(cuda_source(), "aesgcm.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:
            pytest.fail(f"NVRTC failed: {exc}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog).strip()
        assert "warning" not in log.lower(), log
        assert len(nvrtc.getCUBIN(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


def test_source_has_no_includes_and_all_kernels() -> None:
    src = cuda_source()
    includes = [line for line in src.splitlines() if line.lstrip().startswith("#include")]
    assert includes == []  # NVRTC gets no include path from us
    for name in KERNEL_NAMES:
        assert re.search(rf'extern "C" __global__ void __launch_bounds__\(PLM_TPB(, \w+)?\)\n    {name}\(', src), name
