"""Test-only stand-in for the parts of CuPy that aesgcm_cuda.py uses, with "device memory" in host
memory and RawModule compiling aesgcm.cu through the CPU emulator (tests/gpu/emu).

It lets CudaAesGcm's own code -- argument checks, plan execution, argument packing, the batch table
and its upload, scratch and flag handling, DecryptResult, decrypt_results_ok -- run on a machine
without a GPU. Kernel calls are checked the way the real launch would need them to be: grid and
block as 1-tuples, block == PLM_TPB, and every argument a numpy uint32/uint64 scalar matching the
kernel's C signature.

``make_module(fast=True)`` swaps the emulated kernels for *fast* ones with the same contract, for end
to end dry runs (bench/gpu_check.py --dry-run) where the emulator would take hours: they read the
very batch table the kernels read, authenticate each message with `cryptography` into its flag, and
the CTR launch writes the plaintexts only if every flag of the batch is OK. (The kernels themselves
are checked by the emulator, launch by launch.)
"""

from __future__ import annotations

import contextlib
import ctypes
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from gpu_cu_signatures import kernel_signatures
from gpu_emu_runner import EMU_DIR, cxx_compiler, load_emulator

uint8 = np.uint8
uint32 = np.uint32


class _MemPtr:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Device:
    def __init__(self, device: int | None = None) -> None:
        self.id = 0 if device is None else int(device)

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def use(self) -> None:
        return None


class Stream:
    """Records synchronisations; work runs eagerly, so it is always complete."""

    _stack: ClassVar[list[Stream]] = []

    def __init__(self, non_blocking: bool = False) -> None:
        self.non_blocking = non_blocking
        self.synchronized = 0
        self.ptr = id(self)

    def __enter__(self) -> Stream:
        Stream._stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        Stream._stack.pop()

    def synchronize(self) -> None:
        self.synchronized += 1

    def wait_event(self, event: Any) -> None:
        return None


_NULL_STREAM = Stream()


def get_current_stream() -> Stream:
    return Stream._stack[-1] if Stream._stack else _NULL_STREAM


class ndarray:
    def __init__(self, a: Any, dtype: Any = None, memptr: Any = None) -> None:
        if memptr is not None:  # cupy.ndarray(shape, dtype, memptr=...): a view of existing device memory
            n = int(np.prod(a)) * np.dtype(dtype).itemsize
            a = memptr.mem.arr[memptr.offset : memptr.offset + n].view(dtype).reshape(a)
        self._a = a

    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    shape = property(lambda self: self._a.shape)
    data = property(lambda self: _MemPtr(int(self._a.ctypes.data)))
    device = property(lambda self: _Device(0))

    def __getitem__(self, index: Any) -> ndarray:
        return ndarray(self._a[index])

    def __setitem__(self, index: Any, value: Any) -> None:
        self._a[index] = value._a if isinstance(value, ndarray) else value

    def view(self, dtype: Any) -> ndarray:
        return ndarray(self._a.view(dtype))

    def reshape(self, *shape: Any) -> ndarray:
        return ndarray(self._a.reshape(*shape))

    def get(self, stream: Stream | None = None) -> np.ndarray:
        (stream or get_current_stream()).synchronize()
        return self._a.copy()

    __hash__ = None  # type: ignore[assignment]  # like cupy.ndarray: unhashable

    def __eq__(self, other: object) -> ndarray:  # type: ignore[override]
        return ndarray(self._a == (other._a if isinstance(other, ndarray) else other))

    def all(self) -> np.bool_:
        return self._a.all()

    # DLPack: the fake's device memory is host memory, so it travels as a CPU tensor (torch.from_dlpack
    # gives a CPU tensor sharing it), as a real CuPy array travels as a CUDA tensor.
    def __dlpack__(self, **kwargs: Any) -> Any:
        kwargs.pop("stream", None)
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self) -> Any:
        return self._a.__dlpack_device__()


def _aligned(nbytes: int) -> np.ndarray:
    """Like a CuPy pool allocation: 256-byte aligned."""
    raw = np.empty(nbytes + 256, dtype=np.uint8)
    start = (-raw.ctypes.data) % 256
    return raw[start : start + nbytes]


def empty(n: int, dtype: Any = np.uint8) -> ndarray:
    itemsize = np.dtype(dtype).itemsize
    buf = _aligned(n * itemsize)
    buf[:] = np.random.default_rng().integers(0, 256, buf.size, dtype=np.uint8)  # garbage, as on a GPU
    return ndarray(buf.view(dtype))


def zeros(n: int, dtype: Any = np.uint8) -> ndarray:
    out = empty(n, dtype)
    out._a[:] = 0
    return out


def full(n: int, value: int, dtype: Any = np.uint8) -> ndarray:
    out = empty(n, dtype)
    out._a[:] = value
    return out


def asarray(a: Any) -> ndarray:
    if isinstance(a, ndarray):
        return a  # like CuPy: no copy of what is already on the device
    out = empty(a.size, a.dtype)
    out._a[:] = a.ravel()
    return out


def from_dlpack(a: Any) -> ndarray:
    """Host memory is this fake's device memory: import a CPU DLPack tensor in place."""
    return ndarray(np.from_dlpack(a))


def asnumpy(a: Any) -> np.ndarray:
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def concatenate(arrays: list[ndarray]) -> ndarray:
    return ndarray(np.concatenate([x._a for x in arrays]))


class _Kernel:
    def __init__(self, lib: Any, name: str, tpb: int) -> None:
        self._lib, self._name, self._tpb = lib, name, tpb
        self._sig = kernel_signatures()[name]
        self.calls = 0

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        assert isinstance(grid, tuple) and len(grid) == 1 and grid[0] >= 1, grid
        assert block == (self._tpb,), block
        assert len(args) == len(self._sig), (self._name, len(args))
        for kind, arg in zip(self._sig, args, strict=True):
            expected = np.uint32 if kind == "u32" else np.uint64
            assert type(arg) is expected, (self._name, kind, type(arg))
        values = (ctypes.c_uint64 * len(args))(*[int(a) for a in args])
        rc = self._lib.emu_launch(self._name.encode(), int(grid[0]), values, len(args))
        assert rc == 0, self._name
        self.calls += 1


def _mem(address: int, n: int) -> np.ndarray:
    """n bytes of fake device memory at an address."""
    if n == 0:
        return np.zeros(0, np.uint8)
    return np.frombuffer((ctypes.c_uint8 * n).from_address(address), dtype=np.uint8)


class _FastKernel:
    """One kernel of the batch plan done with `cryptography` on the table's messages (see the module
    docstring); same argument checks as _Kernel."""

    _stash: ClassVar[dict[int, list[bytes | None]]] = {}  # table address -> plaintexts (decrypt)

    def __init__(self, name: str, defines: dict[str, int]) -> None:
        self._name, self._d = name, defines
        self._sig = kernel_signatures()[name]
        self.calls = 0

    def _table(self, tab: int, n: int) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
        d = self._d
        msgs = -(-n // 4) * 4
        words = msgs + n * d["PLM_MSG_WORDS"] + (d["PLM_MAX_LEVELS"] + 1) * (n + 1)
        t = _mem(tab, 4 * words).view("<u4")
        out = []
        for m in range(n):
            w = t[msgs + m * d["PLM_MSG_WORDS"] :]
            u64 = lambda i, w=w: int(w[i]) | (int(w[i + 1]) << 32)  # noqa: E731
            nonce = b"".join(int(x).to_bytes(4, "big") for x in w[d["PLM_MSG_NONCE"] : d["PLM_MSG_NONCE"] + 3])
            out.append({"src": u64(d["PLM_MSG_SRC"]), "dst": u64(d["PLM_MSG_DST"]), "n": u64(d["PLM_MSG_NBYTES"]),
                        "nonce": nonce})  # fmt: skip
        starts = t[msgs + n * d["PLM_MSG_WORDS"] :].reshape(d["PLM_MAX_LEVELS"] + 1, n + 1)
        return t, out, starts

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        assert isinstance(grid, tuple) and len(grid) == 1 and grid[0] >= 1, grid
        assert block == (self._d["PLM_TPB"],), block
        assert len(args) == len(self._sig), (self._name, len(args))
        for kind, arg in zip(self._sig, args, strict=True):
            assert type(arg) is (np.uint32 if kind == "u32" else np.uint64), (self._name, kind, type(arg))
        self.calls += 1
        ctx, tab, n = int(args[0]), int(args[1]), int(args[2])
        rk = _mem(ctx + 4 * self._d["PLM_CTX_RK"], 32).view("<u4")
        key = b"".join(int(x).to_bytes(4, "big") for x in rk)  # AES-256 round keys 0..7 are the key
        aead = AESGCM(key)
        flags, msgs, starts = self._table(tab, n)
        if self._name == "plm_gcm_ghash_ct":
            plain: list[bytes | None] = []
            for m, msg in enumerate(msgs):
                try:
                    plain.append(aead.decrypt(msg["nonce"], _mem(msg["src"], msg["n"] + 16).tobytes(), None))
                    flags[m] = self._d["PLM_FLAG_OK"]
                except InvalidTag:
                    plain.append(None)
            _FastKernel._stash[tab] = plain
        elif self._name == "plm_gcm_ctr_decrypt":
            plain = _FastKernel._stash.pop(tab)
            if not (flags[:n] == self._d["PLM_FLAG_OK"]).all():
                return  # the batch gate
            ctr = starts[self._d["PLM_MAX_LEVELS"]]
            for m, msg in enumerate(msgs):
                pt = plain[m]
                if ctr[m + 1] > ctr[m] and pt is not None:
                    _mem(msg["dst"], msg["n"])[:] = np.frombuffer(pt, np.uint8)
        elif self._name == "plm_gcm_encrypt":
            for msg in msgs:
                sealed = aead.encrypt(msg["nonce"], _mem(msg["src"], msg["n"]).tobytes(), None)
                _mem(msg["dst"], msg["n"] + 16)[:] = np.frombuffer(sealed, np.uint8)
        # plm_gcm_ghash_reduce: the whole tag was done at level 0


class RawModule:
    compiled = 0
    fast = False  # set by make_module(fast=True)

    def __init__(self, code: str, options: tuple[str, ...] = ()) -> None:
        assert all(o.startswith(("-D", "-std=")) for o in options), options
        if self.fast:
            self._defines = {}
            for o in options:
                if o.startswith("-D"):
                    name, value = o[2:].split("=", 1)
                    self._defines[name] = int(value.rstrip("u"), 0)
            type(self).compiled += 1
            return
        cxx = cxx_compiler()
        assert cxx is not None
        defines = [o for o in options if o.startswith("-D")]
        assert all(o.startswith(("-D", "-std=")) for o in options), options
        self._tpb = int(next(o for o in defines if o.startswith("-DPLM_TPB=")).split("=")[1])
        self._dir = tempfile.TemporaryDirectory()
        src = Path(self._dir.name) / "aesgcm.cu"
        src.write_text(code)
        lib = Path(self._dir.name) / "aesgcm_emu.so"
        subprocess.run(
            [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing",
             "-Wno-unknown-pragmas", f"-I{EMU_DIR}", "-include", "cuda_emu.h", *defines,
             "-x", "c++", str(src), "-x", "none", str(EMU_DIR / "harness.cpp"), "-o", str(lib)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        self._lib = load_emulator(lib)
        type(self).compiled += 1

    def get_function(self, name: str) -> _Kernel | _FastKernel:
        if self.fast:
            return _FastKernel(name, self._defines)
        return _Kernel(self._lib, name, self._tpb)


class Event:
    def __init__(self, disable_timing: bool = False) -> None:
        self.disable_timing = disable_timing

    done = True  # work runs eagerly

    def record(self, stream: Stream | None = None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        return None


class RawKernel:
    """Only the benchmark's spin kernel uses this: check its argument, do nothing."""

    def __init__(self, code: str, name: str) -> None:
        assert f"void {name}(" in code
        self.calls = 0

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        assert grid == (1,) and block == (1,) and type(args[0]) is np.int64
        self.calls += 1


MEMCPY_LOG: list[tuple[int, int, int, int]] = []  # (kind, dst, src, size): kind 1 H2D, 2 D2H, 3 D2D
REGISTERED: dict[int, int] = {}


def _memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    assert kind in (1, 2, 3) and isinstance(stream, int)
    MEMCPY_LOG.append((kind, dst, src, size))
    ctypes.memmove(dst, src, size)


def h2d_copies_from(base: int, size: int, since: int = 0) -> list[tuple[int, int, int, int]]:
    """The host-to-device copies logged since index `since` whose source lies in [base, base + size)."""
    return [c for c in MEMCPY_LOG[since:] if c[0] == 1 and base <= c[2] < base + size]


def _host_register(ptr: int, size: int, flags: int) -> None:
    assert ptr not in REGISTERED and size > 0
    REGISTERED[ptr] = size


def _host_unregister(ptr: int) -> None:
    del REGISTERED[ptr]


def _ipc_get(ptr: int) -> bytes:
    return ptr.to_bytes(8, "little") + bytes(56)  # same process only: the "handle" is the address


def _ipc_open(handle: bytes) -> int:
    assert len(handle) == 64
    return int.from_bytes(handle[:8], "little")


def _alloc_pinned(n: int) -> Any:
    return (ctypes.c_uint8 * n)()


class _Memory:
    def __init__(self, size: int) -> None:
        self.arr = _aligned(size)
        self.ptr = int(self.arr.ctypes.data)


class _MemoryPointer:
    def __init__(self, mem: _Memory, offset: int) -> None:
        self.mem, self.offset = mem, offset


def make_module(fast: bool = False) -> types.ModuleType:
    """A fresh fake `cupy` module object (fast: `cryptography` in place of the emulated kernels)."""
    mod = types.ModuleType("cupy")
    raw_module = type("RawModule", (RawModule,), {"fast": fast, "compiled": 0})
    cuda = types.SimpleNamespace(
        Device=_Device,
        Stream=Stream,
        get_current_stream=get_current_stream,
        is_available=lambda: True,
        runtime=types.SimpleNamespace(
            getDeviceProperties=lambda i: {"name": b"Emulated GPU (CPU)"},
            runtimeGetVersion=lambda: 13000,
            memcpyAsync=_memcpy_async,
            memcpyDeviceToDevice=3,
            hostRegister=_host_register,
            hostUnregister=_host_unregister,
            ipcGetMemHandle=_ipc_get,
            ipcOpenMemHandle=_ipc_open,
            ipcCloseMemHandle=lambda ptr: None,
        ),
        alloc_pinned_memory=_alloc_pinned,
        Memory=_Memory,
        MemoryPointer=_MemoryPointer,
        nvrtc=types.SimpleNamespace(getVersion=lambda: (13, 0)),
        Event=Event,
        get_elapsed_time=lambda start, end: 0.5,
    )
    mod.__dict__["__version__"] = "fake"
    for name, value in {
        "ndarray": ndarray, "uint8": uint8, "uint32": uint32, "empty": empty, "zeros": zeros,
        "full": full, "asarray": asarray, "asnumpy": asnumpy, "from_dlpack": from_dlpack, "concatenate": concatenate,
        "RawModule": raw_module, "cuda": cuda, "RawKernel": RawKernel,
    }.items():  # fmt: skip
        setattr(mod, name, value)
    return mod


@contextlib.contextmanager
def installed(fake: types.ModuleType, *, by_name: bool = True) -> Iterator[types.ModuleType]:
    """`fake` as the CuPy of `aesgcm_cuda` (its compiled-module cache emptied) and, if `by_name`, as
    `sys.modules["cupy"]` too (for code that imports it by name); everything is put back afterwards, so a
    test with one fake leaves no trace for the next."""
    from pipellm_client.gpu import aesgcm_cuda

    saved_cupy, saved_modules, saved_sys = aesgcm_cuda._cupy, dict(aesgcm_cuda._modules), sys.modules.get("cupy")
    aesgcm_cuda._cupy = lambda: fake
    aesgcm_cuda._modules.clear()
    if by_name:
        sys.modules["cupy"] = fake
    try:
        yield fake
    finally:
        aesgcm_cuda._cupy = saved_cupy
        aesgcm_cuda._modules.clear()
        aesgcm_cuda._modules.update(saved_modules)
        if by_name:
            if saved_sys is None:
                sys.modules.pop("cupy", None)
            else:
                sys.modules["cupy"] = saved_sys
