"""Test-only: build aesgcm.cu as host C++ (tests/gpu/emu) and run a Plan through it on the CPU.

This executes the real kernel source -- the batch table and block-to-message search, indexing,
padding, byte order, tail handling, flag logic and the batch gate, the launch plan -- on a machine
without a GPU. Every buffer (each message's source and destination, the scratch with the table)
gets guard bytes on both sides, checked after every launch, so an out-of-bounds write by a kernel
fails the test.
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


def load_emulator(lib_path: Path) -> ctypes.CDLL:
    """The compiled emulator, its `emu_launch(kernel, grid, params, n_params)` typed."""
    lib = ctypes.CDLL(str(lib_path))
    lib.emu_launch.argtypes = [
        ctypes.c_char_p,
        ctypes.c_uint,
        ctypes.POINTER(ctypes.c_uint64),
        ctypes.c_int,
    ]
    lib.emu_launch.restype = ctypes.c_int
    return lib


class GuardedBuffer:
    """A 16-byte aligned byte buffer with guard bytes around it."""

    def __init__(self, data: npt.NDArray[np.uint8] | int) -> None:
        size = data if isinstance(data, int) else int(data.size)
        raw = np.full(size + 2 * GUARD + 16, GUARD_BYTE, dtype=np.uint8)
        start = (-raw.ctypes.data) % 16 + GUARD
        self._raw = raw
        self._start = start
        self._size = size
        self.view = raw[start : start + size]
        if not isinstance(data, int):
            self.view[:] = data

    @property
    def address(self) -> int:
        return int(self._raw.ctypes.data) + self._start

    def guards_intact(self) -> bool:
        head = self._raw[: self._start]
        tail = self._raw[self._start + self._size :]
        return bool((head == GUARD_BYTE).all() and (tail == GUARD_BYTE).all())

    def prefix(self, n: int) -> GuardedBuffer:
        """The first n bytes, same memory and same guards (an in-place destination)."""
        alias = GuardedBuffer.__new__(GuardedBuffer)
        alias._raw, alias._start, alias._size = self._raw, self._start, self._size
        alias.view = self.view[:n]
        return alias


class EmulatedAesGcm:
    """Same interface as RefAesGcm, but the kernels are aesgcm.cu compiled for the CPU."""

    def __init__(self, lib_path: Path, key: bytes, params: GcmParams) -> None:
        self.params = params
        self._lib = load_emulator(lib_path)
        self.ctx = GuardedBuffer(build_context(key, params).view(np.uint8))
        self.guarded: list[GuardedBuffer] = []  # every message buffer of the running batch

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
        for i, buf in enumerate(self.guarded):
            if not buf.guards_intact():
                raise AssertionError(f"{launch.kernel} wrote outside message buffer {i}")

    def new_scratch(self, plan: Plan) -> GuardedBuffer:
        """Scratch as cupy.empty would give it: garbage, with stale OK flags."""
        scratch = GuardedBuffer(np.random.default_rng().integers(0, 256, plan.scratch_bytes, dtype=np.uint8))
        scratch.view[: 4 * plan.n] = np.full(plan.n, FLAG_OK, dtype="<u4").view(np.uint8)
        return scratch

    def run(
        self,
        plan: Plan,
        nonces: list[bytes],
        srcs: list[GuardedBuffer],
        dsts: list[GuardedBuffer | None],
        scratch: GuardedBuffer | None = None,
    ) -> GuardedBuffer:
        """Upload the table into scratch (garbage with stale OK flags), run every launch; returns it."""
        scratch = scratch if scratch is not None else self.new_scratch(plan)
        table = plan.table(
            nonces,
            [b.address if b.view.size else 0 for b in srcs],
            [b.address if b is not None and b.view.size else 0 for b in dsts],
        )
        scratch.view[: plan.table_bytes] = table.view(np.uint8)  # the upload
        self.guarded = [*srcs, *(d for d in dsts if d is not None)]
        bufs = {Buf.CTX: self.ctx, Buf.SCRATCH: scratch}
        try:
            for launch in plan.launches:
                self.launch(launch, bufs)
        finally:
            self.guarded = []
        return scratch

    def encrypt_batch(self, items: list[tuple[bytes, npt.NDArray[np.uint8]]]) -> list[npt.NDArray[np.uint8]]:
        srcs = [GuardedBuffer(pt) for _, pt in items]
        dsts = [GuardedBuffer(pt.size + TAG_BYTES) for _, pt in items]
        plan = encrypt_plan([pt.size for _, pt in items], self.params)
        self.run(plan, [n for n, _ in items], srcs, list(dsts))
        return [d.view.copy() for d in dsts]

    def encrypt(self, nonce: bytes, pt: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        return self.encrypt_batch([(nonce, pt)])[0]

    def decrypt_batch(
        self, items: list[tuple[bytes, npt.NDArray[np.uint8], npt.NDArray[np.uint8] | None]]
    ) -> tuple[list[bool], list[npt.NDArray[np.uint8] | None]]:
        """(each tag ok, each destination after the call); destination i starts as items[i][2]
        (None: verify only)."""
        srcs = [GuardedBuffer(data) for _, data, _ in items]
        dsts = [GuardedBuffer(init) if init is not None else None for _, _, init in items]
        writes = [i is not None for _, _, i in items]
        plan = decrypt_plan([d.size - TAG_BYTES for _, d, _ in items], self.params, writes)
        scratch = self.run(plan, [n for n, _, _ in items], srcs, dsts)
        flags = scratch.view[: 4 * plan.n].view("<u4")
        return [int(f) == FLAG_OK for f in flags], [d.view.copy() if d is not None else None for d in dsts]

    def decrypt_into(
        self, nonce: bytes, data: npt.NDArray[np.uint8], out_init: npt.NDArray[np.uint8]
    ) -> tuple[bool, npt.NDArray[np.uint8]]:
        """(tag ok, destination after the call); the destination starts as out_init."""
        oks, outs = self.decrypt_batch([(nonce, data, out_init)])
        out = outs[0]
        assert out is not None
        return oks[0], out
