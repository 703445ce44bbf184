"""AES-256-GCM on a CUDA GPU through CuPy (the GPU endpoint's decrypt and encrypt).

Ciphertext layout is the project's everywhere: ``ct || tag`` (16-byte tag), as
``cryptography``'s ``AESGCM.encrypt_into(nonce, data, None, buf)`` writes it. No AAD.

Messages go in batches: :meth:`CudaAesGcm.decrypt_batch_into` and :meth:`~CudaAesGcm.encrypt_batch_into`
run any number of messages (each with its own nonce, length and buffers) in a fixed number of
kernel launches (plan.py); the single-message calls are batches of one.

Decrypt never lets a destination hold unauthenticated plaintext, even for a moment: GHASH and the
tag comparison of every message of the batch run first and write one device flag per message; the
CTR pass that writes plaintext runs after them in the same stream and returns at once unless every
flag of the batch is OK. On any bad tag no destination of the batch is written (not even zeroed).
Decrypt calls do not wait: they return a :class:`DecryptResult` whose :meth:`~DecryptResult.ok`
synchronises, so several batches can be queued before one wait (see :func:`decrypt_results_ok`).

The batch table is control data: it is built in this process, staged in pinned host memory private
to it (never the bounce arena) and copied to the device ahead of the launches on the same stream.

CuPy is imported lazily, so importing this module works without it; :func:`cuda_available` says
whether the GPU path can run. The kernels (``aesgcm.cu``) are compiled once per process and device
with NVRTC, for the device's own architecture (CuPy picks it), with the constants of
:class:`~pipellm_client.gpu.params.GcmParams` as -D defines.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .keyctx import build_context
from .params import (
    AES_BLOCK,
    DEFAULT_PARAMS,
    FLAG_OK,
    KERNEL_NAMES,
    KEY_BYTES,
    MAX_BATCH,
    TAG_BYTES,
    GcmParams,
)
from .plan import U32, U64, Buf, Plan, Ptr, check_nonce, decrypt_plan, encrypt_plan

_H2D = 1  # cudaMemcpyHostToDevice

CU_SOURCE_PATH = Path(__file__).with_name("aesgcm.cu")
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

_module_lock = threading.Lock()
_modules: dict[tuple[int, GcmParams], dict[str, Any]] = {}


def _cupy() -> Any:
    """Import CuPy on first use (typed Any: mypy need not know CuPy)."""
    return importlib.import_module("cupy")


def cuda_available() -> tuple[bool, str]:
    """(True, device name) if the CuPy GPU path can run here, else (False, why). Never raises."""
    try:
        cp = _cupy()
    except ImportError as exc:
        return False, f"cupy is not installed ({exc})"
    except Exception as exc:  # a broken install can raise anything at import
        return False, f"cupy failed to import: {type(exc).__name__}: {exc}"
    try:
        if not cp.cuda.is_available():
            return False, "no usable CUDA device (cupy.cuda.is_available() is False)"
        device_id = cp.cuda.Device().id
        name = cp.cuda.runtime.getDeviceProperties(device_id)["name"]
        if isinstance(name, bytes):
            name = name.decode(errors="replace")
    except Exception as exc:
        return False, f"CUDA device query failed: {type(exc).__name__}: {exc}"
    try:
        # An attribute of cupy.cuda (bound from cupy_backends), not an importable submodule.
        cp.cuda.nvrtc.getVersion()
    except Exception as exc:
        return False, f"NVRTC is unavailable: {type(exc).__name__}: {exc}"
    return True, str(name)


def cuda_source() -> str:
    """The kernel source, as shipped next to this module."""
    return CU_SOURCE_PATH.read_text(encoding="utf-8")


def compile_options(params: GcmParams = DEFAULT_PARAMS) -> tuple[str, ...]:
    """NVRTC options for aesgcm.cu (CuPy adds -arch for the current device itself)."""
    return NVRTC_OPTIONS + params.cuda_defines()


def _kernels(params: GcmParams, device_id: int) -> dict[str, Any]:
    """The compiled kernels for one device, compiled on first use and cached for the process."""
    key = (device_id, params)
    with _module_lock:
        found = _modules.get(key)
        if found is not None:
            return found
        cp = _cupy()
        with cp.cuda.Device(device_id):
            module = cp.RawModule(code=cuda_source(), options=compile_options(params))
            kernels = {name: module.get_function(name) for name in KERNEL_NAMES}
            kernels["__module__"] = module  # keep the module alive with its functions
        _modules[key] = kernels
        return kernels


def _check_batch(items: Sequence[object]) -> None:
    if not items:
        raise ValueError("a batch needs at least one message")
    if len(items) > MAX_BATCH:
        raise ValueError(f"a batch holds at most {MAX_BATCH} messages, got {len(items)}")


def _check_array(arr: Any, what: str, device_id: int) -> None:
    """A C-contiguous uint8 cupy array on our device, starting 16-byte aligned (uint4 access)."""
    cp = _cupy()
    if not isinstance(arr, cp.ndarray):
        raise TypeError(f"{what} must be a cupy.ndarray, got {type(arr).__name__}")
    if arr.dtype != cp.uint8:
        raise TypeError(f"{what} must have dtype uint8, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")
    if arr.size == 0:
        return
    if arr.device.id != device_id:
        raise ValueError(f"{what} is on device {arr.device.id}, the key lives on device {device_id}")
    if arr.data.ptr % AES_BLOCK:
        raise ValueError(
            f"{what} must start on a 16-byte boundary (device address 0x{arr.data.ptr:x}); "
            "slice at multiples of 16 bytes"
        )


def _check_overlap(src: Any, dst: Any) -> None:
    """Exact in-place (same start) is supported; any other overlap is refused."""
    if src.size == 0 or dst.size == 0:
        return
    s0, s1 = src.data.ptr, src.data.ptr + src.nbytes
    d0, d1 = dst.data.ptr, dst.data.ptr + dst.nbytes
    if s0 < d1 and d0 < s1 and s0 != d0:
        raise ValueError("source and destination overlap; only exact in-place (same start) is allowed")


def _check_batch_overlaps(srcs: Sequence[Any], dsts: Sequence[Any | None]) -> None:
    """Within a batch a destination may overlap nothing but its own source, and only in place.

    (A CTR write into another message's ciphertext after its tag was checked would decrypt
    something other than what was authenticated.) Sources may overlap each other freely.
    """
    spans: list[tuple[int, int, int, bool]] = []  # start, end, message, is_destination
    for i, (src, dst) in enumerate(zip(srcs, dsts, strict=True)):
        if src.size:
            spans.append((int(src.data.ptr), int(src.data.ptr) + int(src.nbytes), i, False))
        if dst is not None and dst.size:
            _check_overlap(src, dst)
            spans.append((int(dst.data.ptr), int(dst.data.ptr) + int(dst.nbytes), i, True))
    spans.sort()
    active: list[tuple[int, int, int, bool]] = []
    for span in spans:
        start, _end, msg, is_dst = span
        active = [a for a in active if a[1] > start]
        for a in active:
            if (is_dst or a[3]) and a[2] != msg:
                what = "destination" if is_dst else "source"
                raise ValueError(
                    f"the {what} of message {msg} overlaps the {'destination' if a[3] else 'source'} of message "
                    f"{a[2]}; in a batch a destination may only coincide with its own source"
                )
        active.append(span)


class DecryptResult:
    """The outcome of one queued batch of decrypts: one device flag per message, written by the
    tag checks."""

    __slots__ = ("_n", "_scratch", "_stream")

    def __init__(self, scratch: Any, stream: Any, n: int = 1) -> None:
        self._scratch = scratch  # words 0..n-1 are the flags; holding it keeps the memory alive
        self._stream = stream
        self._n = n

    @property
    def n(self) -> int:
        """Messages in the batch."""
        return self._n

    @property
    def flags(self) -> Any:
        """The device flags (cupy uint32 array, one per message): params.FLAG_OK where the tag matched."""
        return self._scratch[: 4 * self._n].view(_cupy().uint32)

    @property
    def flag(self) -> Any:
        """The device flags; for a single message, an array of one."""
        return self.flags

    @property
    def stream(self) -> Any:
        """The stream the batch was queued on."""
        return self._stream

    def oks(self) -> list[bool]:
        """Wait for the batch; whether each message's tag matched."""
        values = self.flags.get(stream=self._stream)
        return [int(v) == FLAG_OK for v in values]

    def ok(self) -> bool:
        """Wait for the batch and say whether every tag matched (only then was plaintext written)."""
        return all(self.oks())


def decrypt_results_ok(results: Sequence[DecryptResult]) -> list[bool]:
    """Wait once per stream for several queued batches, then read all flags in one copy; one bool
    per result: whether every message of that batch authenticated."""
    if not results:
        return []
    cp = _cupy()
    streams: dict[int, Any] = {}
    for result in results:
        streams.setdefault(id(result.stream), result.stream)
    for stream in streams.values():
        stream.synchronize()
    devices = {int(r.flags.device.id) for r in results}
    if len(devices) != 1:
        return [r.ok() for r in results]
    with cp.cuda.Device(devices.pop()):
        flags = cp.concatenate([r.flags for r in results]).get()
    out, at = [], 0
    for r in results:
        out.append(bool(all(int(f) == FLAG_OK for f in flags[at : at + r.n])))
        at += r.n
    return out


@dataclass
class _Staged:
    """One pinned host buffer for batch tables and the event after the last copy out of it."""

    mem: Any
    host: np.ndarray[Any, np.dtype[np.uint8]]
    event: Any = None


class _TableUploads:
    """Copies batch tables to the device from pinned host memory private to this process.

    A pool of buffers: one is rewritten only after the copy out of it has completed (its event), so
    any number of batches can be queued without the host waiting for the GPU (up to MAX buffers in
    flight; beyond that the oldest copy is waited for) and none can see another's table.
    """

    MAX = 256

    def __init__(self) -> None:
        self._pool: list[_Staged] = []
        self._next = 0

    def _free(self, nbytes: int) -> _Staged:
        pool = self._pool
        for k in range(len(pool)):
            slot = pool[(self._next + k) % len(pool)]
            if slot.host.size >= nbytes and (slot.event is None or slot.event.done):
                self._next = (self._next + k + 1) % len(pool)
                return slot
        if len(pool) < self.MAX:
            size = max(4096, -(-nbytes // 4096) * 4096)
            mem = _cupy().cuda.alloc_pinned_memory(size)
            slot = _Staged(mem, np.frombuffer(mem, dtype=np.uint8, count=size))
            pool.append(slot)
            return slot
        slot = pool[self._next]  # every buffer is in flight: wait for the oldest
        self._next = (self._next + 1) % len(pool)
        if slot.event is not None:
            slot.event.synchronize()
        if slot.host.size < nbytes:
            size = -(-nbytes // 4096) * 4096
            slot.mem = _cupy().cuda.alloc_pinned_memory(size)
            slot.host = np.frombuffer(slot.mem, dtype=np.uint8, count=size)
        return slot

    def upload(self, table: np.ndarray[Any, Any], dst_ptr: int, stream: Any) -> None:
        cp = _cupy()
        raw = table.view(np.uint8).ravel()
        slot = self._free(raw.size)
        slot.host[: raw.size] = raw
        cp.cuda.runtime.memcpyAsync(dst_ptr, int(slot.host.ctypes.data), raw.size, _H2D, stream.ptr)
        event = cp.cuda.Event(disable_timing=True)
        event.record(stream)
        slot.event = event


class CudaAesGcm:
    """AES-256-GCM with one key on one CUDA device (96-bit nonce, 128-bit tag, no AAD).

    The round keys, T-table, GHASH tables and powers of H are computed on the host once per key
    (keyctx.build_context, the same code the numpy reference uses) and uploaded once.
    """

    def __init__(
        self,
        key: bytes,
        *,
        params: GcmParams = DEFAULT_PARAMS,
        device: int | None = None,
    ) -> None:
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"key must be bytes, got {type(key).__name__}")
        if len(bytes(key)) != KEY_BYTES:
            raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes, got {len(bytes(key))}")
        cp = _cupy()
        self.params = params
        self._device_id = int(cp.cuda.Device(device).id if device is not None else cp.cuda.Device().id)
        host_ctx = build_context(bytes(key), params)
        with cp.cuda.Device(self._device_id):
            self._kernels = _kernels(params, self._device_id)
            self._ctx = cp.asarray(host_ctx)
            cp.cuda.get_current_stream().synchronize()  # the context is ready for every stream
        self._uploads = _TableUploads()

    @property
    def device_id(self) -> int:
        """The CUDA device this key's context lives on."""
        return self._device_id

    def _launch(self, plan: Plan, table: np.ndarray[Any, Any], stream: Any) -> tuple[Any, Any]:
        """Upload the table and run a plan on `stream` (current stream if None); return (scratch
        buffer, stream used)."""
        cp = _cupy()
        tpb = (self.params.threads_per_block,)
        with cp.cuda.Device(self._device_id):
            if stream is None:
                stream = cp.cuda.get_current_stream()
            with stream:
                scratch = cp.empty(plan.scratch_bytes, dtype=cp.uint8)
                self._uploads.upload(table, int(scratch.data.ptr), stream)
                base = {Buf.CTX: int(self._ctx.data.ptr), Buf.SCRATCH: int(scratch.data.ptr)}
                for launch in plan.launches:
                    args: list[np.generic] = []
                    for arg in launch.args:
                        if isinstance(arg, Ptr):
                            args.append(np.uint64(base[arg.buf] + arg.offset))
                        elif isinstance(arg, U32):
                            args.append(np.uint32(arg.value))
                        elif isinstance(arg, U64):
                            args.append(np.uint64(arg.value))
                        else:  # pragma: no cover - Arg is a closed union
                            raise TypeError(f"unknown kernel argument {arg!r}")
                    self._kernels[launch.kernel]((launch.grid,), tpb, tuple(args))
        return scratch, stream

    def _batch_columns(self, items: Sequence[tuple[bytes, Any, Any]]) -> tuple[list[bytes], list[Any], list[Any]]:
        """A batch's nonces, datas and outs, with the batch's length, every nonce and every data checked."""
        _check_batch(items)
        nonces = [check_nonce(nonce) for nonce, _d, _o in items]
        datas = [d for _n, d, _o in items]
        for data in datas:
            _check_array(data, "data", self._device_id)
        return nonces, datas, [o for _n, _d, o in items]

    def _within_maximum(self, what: str, n: int) -> int:
        """`n`, or ValueError when a message that long does not fit the launch plan's tables."""
        if n > self.params.max_message_bytes:
            raise ValueError(f"{what} of {n} bytes exceeds the maximum of {self.params.max_message_bytes}")
        return n

    def decrypt_batch_into(self, items: Sequence[tuple[bytes, Any, Any]], *, stream: Any = None) -> DecryptResult:
        """Queue one batch: each item is (nonce, data = ct || tag, out with len(data) - 16 bytes, or
        None to verify only). Every tag is checked before any plaintext is written.

        Returns at once; ``result.ok()`` waits and says whether every tag matched, ``oks()`` which
        did. Unless all did, no `out` of the batch was written. An `out` may be its own `data`
        (in place); any other overlap with a buffer of the batch is refused.
        """
        nonces, datas, outs = self._batch_columns(items)
        sizes = []
        for data, out in zip(datas, outs, strict=True):
            if data.size < TAG_BYTES:
                raise ValueError(f"data must hold at least the {TAG_BYTES}-byte tag, got {data.size} bytes")
            ct_len = int(data.size) - TAG_BYTES
            if out is not None:
                _check_array(out, "out", self._device_id)
                if out.size != ct_len:
                    raise ValueError(f"out must have len(data) - {TAG_BYTES} = {ct_len} bytes, got {out.size}")
            sizes.append(self._within_maximum("ciphertext", ct_len))
        _check_batch_overlaps(datas, outs)
        plan = decrypt_plan(sizes, self.params, [o is not None for o in outs])
        table = plan.table(nonces, [_address(d) for d in datas], [_address(o) for o in outs])
        scratch, used = self._launch(plan, table, stream)
        return DecryptResult(scratch, used, plan.n)

    def encrypt_batch_into(self, items: Sequence[tuple[bytes, Any, Any]], *, stream: Any = None) -> None:
        """Queue one batch: each item is (nonce, data, out = ct || tag with len(data) + 16 bytes).

        An `out` may start at its own `data` (in place, with 16 spare bytes after it); any other
        overlap with a buffer of the batch is refused. Nothing waits: order later work on the same
        stream.
        """
        nonces, datas, outs = self._batch_columns(items)
        sizes = []
        for data, out in zip(datas, outs, strict=True):
            _check_array(out, "out", self._device_id)
            pt_len = int(data.size)
            if out.size != pt_len + TAG_BYTES:
                raise ValueError(f"out must have len(data) + {TAG_BYTES} = {pt_len + TAG_BYTES} bytes, got {out.size}")
            sizes.append(self._within_maximum("plaintext", pt_len))
        _check_batch_overlaps(datas, outs)
        plan = encrypt_plan(sizes, self.params)
        self._launch(plan, plan.table(nonces, [_address(d) for d in datas], [_address(o) for o in outs]), stream)

    def decrypt_into(self, nonce: bytes, data: Any, out: Any, *, stream: Any = None) -> DecryptResult:
        """Queue the decryption of `data` (ct || tag) into `out` (len(data) - 16 bytes): a batch of one.

        Returns at once; ``result.ok()`` waits and says whether the tag matched. If it did not,
        `out` was not written. `out` may be `data` itself (in place); other overlaps are refused.
        """
        return self.decrypt_batch_into([(nonce, data, out)], stream=stream)

    def encrypt_into(self, nonce: bytes, data: Any, out: Any, *, stream: Any = None) -> None:
        """Queue the encryption of `data` into `out` = ct || tag (len(data) + 16 bytes): a batch of one.

        `out` may start at `data` (in place, with 16 spare bytes after it); other overlaps are
        refused. Nothing waits: order later work on the same stream.
        """
        self.encrypt_batch_into([(nonce, data, out)], stream=stream)


def _address(arr: Any) -> int:
    """The device address of an array (0 for None or an empty array, which no kernel dereferences)."""
    return int(arr.data.ptr) if arr is not None and arr.size else 0
