"""AES-256-GCM on a CUDA GPU through CuPy (the GPU endpoint's decrypt and encrypt).

Ciphertext layout is the project's everywhere: ``ct || tag`` (16-byte tag), as
``cryptography``'s ``AESGCM.encrypt_into(nonce, data, None, buf)`` writes it. No AAD.

Decrypt never lets the destination hold unauthenticated plaintext, even for a moment: GHASH and
the tag comparison run first and write a device flag; the CTR pass that writes plaintext runs
after them in the same stream and returns at once unless the flag is OK. On a bad tag the
destination is left untouched (not zeroed). :meth:`CudaAesGcm.decrypt_into` does not wait: it
returns a :class:`DecryptResult` whose :meth:`~DecryptResult.ok` synchronises, so several messages
can be queued before one wait (see :func:`decrypt_results_ok`).

CuPy is imported lazily, so importing this module works without it; :func:`cuda_available` says
whether the GPU path can run. The kernels (``aesgcm.cu``) are compiled once per process and device
with NVRTC, for the device's own architecture (CuPy picks it), with the constants of
:class:`~pipellm_client.gpu.params.GcmParams` as -D defines.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
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
    NONCE_BYTES,
    TAG_BYTES,
    GcmParams,
)
from .plan import U32, U64, Buf, Plan, Ptr, decrypt_plan, encrypt_plan

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


def _check_nonce(nonce: object) -> bytes:
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError(f"nonce must be bytes, got {type(nonce).__name__}")
    value = bytes(nonce)
    if len(value) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(value)}")
    return value


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


class DecryptResult:
    """The outcome of one queued decrypt: a device flag, written by the tag check."""

    __slots__ = ("_scratch", "_stream")

    def __init__(self, scratch: Any, stream: Any) -> None:
        self._scratch = scratch  # word 0 is the flag; holding it keeps the memory alive
        self._stream = stream

    @property
    def flag(self) -> Any:
        """The device flag (cupy uint32 array of 1): params.FLAG_OK when the tag matched."""
        return self._scratch[:4].view(_cupy().uint32)

    @property
    def stream(self) -> Any:
        """The stream the decrypt was queued on."""
        return self._stream

    def ok(self) -> bool:
        """Wait for this decrypt and say whether the tag matched (plaintext was written)."""
        value = self.flag.get(stream=self._stream)
        return int(value[0]) == FLAG_OK


def decrypt_results_ok(results: Sequence[DecryptResult]) -> list[bool]:
    """Wait once per stream for a batch of decrypts, then read all flags in one copy."""
    if not results:
        return []
    cp = _cupy()
    streams: dict[int, Any] = {}
    for result in results:
        streams.setdefault(id(result.stream), result.stream)
    for stream in streams.values():
        stream.synchronize()
    devices = {int(r.flag.device.id) for r in results}
    if len(devices) != 1:
        return [r.ok() for r in results]
    with cp.cuda.Device(devices.pop()):
        flags = cp.concatenate([r.flag for r in results]).get()
    return [int(f) == FLAG_OK for f in flags]


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

    @property
    def device_id(self) -> int:
        """The CUDA device this key's context lives on."""
        return self._device_id

    def _launch(self, plan: Plan, src: Any, dst: Any, stream: Any) -> tuple[Any, Any]:
        """Run a plan on `stream` (current stream if None); return (scratch buffer, stream used)."""
        cp = _cupy()
        tpb = (self.params.threads_per_block,)
        with cp.cuda.Device(self._device_id):
            if stream is None:
                stream = cp.cuda.get_current_stream()
            with stream:
                scratch = cp.empty(plan.scratch_bytes, dtype=cp.uint8)
                base = {
                    Buf.CTX: int(self._ctx.data.ptr),
                    Buf.SRC: int(src.data.ptr) if src.size else 0,
                    Buf.DST: int(dst.data.ptr) if dst.size else 0,
                    Buf.SCRATCH: int(scratch.data.ptr),
                }
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

    def decrypt_into(self, nonce: bytes, data: Any, out: Any, *, stream: Any = None) -> DecryptResult:
        """Queue the decryption of `data` (ct || tag) into `out` (len(data) - 16 bytes).

        Returns at once; ``result.ok()`` waits and says whether the tag matched. If it did not,
        `out` was not written. `out` may be `data` itself (in place); other overlaps are refused.
        """
        nonce = _check_nonce(nonce)
        _check_array(data, "data", self._device_id)
        _check_array(out, "out", self._device_id)
        if data.size < TAG_BYTES:
            raise ValueError(f"data must hold at least the {TAG_BYTES}-byte tag, got {data.size} bytes")
        ct_len = int(data.size) - TAG_BYTES
        if out.size != ct_len:
            raise ValueError(f"out must have len(data) - {TAG_BYTES} = {ct_len} bytes, got {out.size}")
        if ct_len > self.params.max_message_bytes:
            raise ValueError(f"ciphertext of {ct_len} bytes exceeds the maximum of {self.params.max_message_bytes}")
        _check_overlap(data, out)
        scratch, used = self._launch(decrypt_plan(ct_len, nonce, self.params), data, out, stream)
        return DecryptResult(scratch, used)

    def encrypt_into(self, nonce: bytes, data: Any, out: Any, *, stream: Any = None) -> None:
        """Queue the encryption of `data` into `out` = ct || tag (len(data) + 16 bytes).

        `out` may start at `data` (in place, with 16 spare bytes after it); other overlaps are
        refused. Nothing waits: order later work on the same stream.
        """
        nonce = _check_nonce(nonce)
        _check_array(data, "data", self._device_id)
        _check_array(out, "out", self._device_id)
        pt_len = int(data.size)
        if out.size != pt_len + TAG_BYTES:
            raise ValueError(f"out must have len(data) + {TAG_BYTES} = {pt_len + TAG_BYTES} bytes, got {out.size}")
        if pt_len > self.params.max_message_bytes:
            raise ValueError(f"plaintext of {pt_len} bytes exceeds the maximum of {self.params.max_message_bytes}")
        _check_overlap(data, out)
        self._launch(encrypt_plan(pt_len, nonce, self.params), data, out, stream)
