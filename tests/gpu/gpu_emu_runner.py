"""Test-only: build aesgcm.cu as host C++ (tests/gpu/emu) and run a Plan through it on the CPU.

This executes the real kernel source -- indexing, padding, byte order, tail handling, flag logic,
the launch plan -- on a machine without a GPU. Buffers get guard bytes on both sides so an
out-of-bounds write by a kernel fails the test.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pipellm_client.gpu.aesgcm_cuda import CU_SOURCE_PATH
from pipellm_client.gpu.keyctx import build_context
from pipellm_client.gpu.params import FLAG_OK, TAG_BYTES, GcmParams
from pipellm_client.gpu.plan import Buf, Launch, Plan, Ptr, decrypt_plan, encrypt_plan

EMU_DIR = Path(__file__).with_name("emu")
GUARD = 64  # guard bytes before and after every buffer
GUARD_BYTE = 0xA5


def cxx_compiler() -> str | None:
    """A C++20 compiler, or None."""
    for name in ("g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def build_emulator(params: GcmParams, out_dir: Path) -> Path:
    """Compile aesgcm.cu + the harness into a shared library for these params."""
    cxx = cxx_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    lib = out_dir / f"aesgcm_emu_{params.threads_per_block}_{abs(hash(params))}.so"
    cmd = [
        cxx,
        "-std=c++20",
        "-O2",
        "-shared",
        "-fPIC",
        "-pthread",
        "-fno-strict-aliasing",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-Wno-unknown-pragmas",
        f"-I{EMU_DIR}",
        "-include",
        "cuda_emu.h",
        *params.cuda_defines(),
        "-x",
        "c++",
        str(CU_SOURCE_PATH),
        "-x",
        "none",
        str(EMU_DIR / "harness.cpp"),
        "-o",
        str(lib),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return lib


class GuardedBuffer:
    """A 16-byte aligned byte buffer with guard bytes around it."""

    def __init__(self, data: npt.NDArray[np.uint8] | int) -> None:
        size = data if isinstance(data, int) else int(data.size)
        raw = np.full(size + 2 * GUARD + 16, GUARD_BYTE, dtype=np.uint8)
        start = (-raw.ctypes.data) % 16 + GUARD
        self._raw = raw
        self._start = start
        self.view = raw[start : start + size]
        if not isinstance(data, int):
            self.view[:] = data

    @property
    def address(self) -> int:
        return int(self._raw.ctypes.data) + self._start

    def guards_intact(self) -> bool:
        head = self._raw[: self._start]
        tail = self._raw[self._start + self.view.size :]
        return bool((head == GUARD_BYTE).all() and (tail == GUARD_BYTE).all())


class EmulatedAesGcm:
    """Same interface as RefAesGcm, but the kernels are aesgcm.cu compiled for the CPU."""

    def __init__(self, lib_path: Path, key: bytes, params: GcmParams) -> None:
        self.params = params
        self._lib = ctypes.CDLL(str(lib_path))
        self._lib.emu_launch.argtypes = [
            ctypes.c_char_p,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_int,
        ]
        self._lib.emu_launch.restype = ctypes.c_int
        self.ctx = GuardedBuffer(build_context(key, params).view(np.uint8))

    def launch(self, launch: Launch, bufs: dict[Buf, GuardedBuffer]) -> None:
        """Run one kernel launch on the given buffers; fail on an out-of-bounds write."""
        values = []
        for arg in launch.args:
            if isinstance(arg, Ptr):
                values.append(bufs[arg.buf].address + arg.offset)
            else:
                values.append(arg.value)
        arr = (ctypes.c_uint64 * len(values))(*values)
        rc = self._lib.emu_launch(launch.kernel.encode(), launch.grid, arr, len(values))
        if rc != 0:
            raise RuntimeError(f"emulator does not know {launch.kernel} with {len(values)} args")
        for name, buf in bufs.items():
            if not buf.guards_intact():
                raise AssertionError(f"{launch.kernel} wrote outside the {name.value} buffer")

    def run(self, plan: Plan, src: GuardedBuffer, dst: GuardedBuffer) -> GuardedBuffer:
        """Run a whole plan; the scratch starts as garbage with a stale OK flag. Returns it."""
        scratch = GuardedBuffer(np.random.default_rng().integers(0, 256, plan.scratch_bytes, dtype=np.uint8))
        scratch.view[:4] = np.array([FLAG_OK], dtype="<u4").view(np.uint8)  # a stale OK flag
        bufs = {Buf.CTX: self.ctx, Buf.SRC: src, Buf.DST: dst, Buf.SCRATCH: scratch}
        for launch in plan.launches:
            self.launch(launch, bufs)
        return scratch

    def encrypt(self, nonce: bytes, pt: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        src = GuardedBuffer(pt)
        dst = GuardedBuffer(pt.size + TAG_BYTES)
        self.run(encrypt_plan(pt.size, nonce, self.params), src, dst)
        return dst.view.copy()

    def decrypt_into(
        self, nonce: bytes, data: npt.NDArray[np.uint8], out_init: npt.NDArray[np.uint8]
    ) -> tuple[bool, npt.NDArray[np.uint8]]:
        """(tag ok, destination after the call); the destination starts as out_init."""
        src = GuardedBuffer(data)
        dst = GuardedBuffer(out_init)
        scratch = self.run(decrypt_plan(data.size - TAG_BYTES, nonce, self.params), src, dst)
        ok = int(scratch.view[:4].view("<u4")[0]) == FLAG_OK
        return ok, dst.view.copy()
