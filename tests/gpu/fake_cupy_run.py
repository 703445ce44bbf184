"""Test-only: run a module or script as __main__ with the fake CuPy of gpu_fake_cupy.py installed.

    python tests/gpu/fake_cupy_run.py [--emulated] -m bench.harness --endpoint cuda ...
    python tests/gpu/fake_cupy_run.py bench/gpu_kernels.py --json out.json

Default: the fast fake (`cryptography` standing in for the kernels, same batch table and gate);
--emulated: the real aesgcm.cu through the CPU emulator (slow: small sizes only). This is how
`bench/gpu_check.py --dry-run` runs every step of `make gpu-check` on a machine without a GPU.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def main(argv: list[str]) -> None:
    emulated = bool(argv) and argv[0] == "--emulated"
    if emulated:
        argv = argv[1:]
    for path in (str(HERE), str(ROOT / "client"), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import gpu_fake_cupy
    from pipellm_client.gpu import aesgcm_cuda

    fake = gpu_fake_cupy.make_module(fast=not emulated)
    sys.modules["cupy"] = fake
    aesgcm_cuda._cupy = lambda: fake
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
