"""Speculative DMA for CUDA endpoints: copy ready ciphertext into the session's device staging early.

The client exports device memory through CUDA IPC; the daemon opens it and, as soon as a speculative
entry's ciphertext is ready, queues an async copy from the bounce arena into that entry's device slot.
A hit is marked `staged` only when the copy has already completed (event query), so the endpoint never
waits on the daemon's stream: it decrypts from device memory at once, or copies from the arena itself.
CuPy is imported only here, only when a CUDA session asks for it.

The declared geometry is not trusted: the session checks it against what its H2D slots need, and here
the driver must confirm that the opened allocation really holds `size` bytes, since copies aimed past it
would land in whatever the daemon has mapped next (another session's staging, say).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import numpy as np

from . import refusal as R

_H2D = 1
IPC_HANDLE_BYTES = 64


def _allocation_span(ptr: int) -> tuple[int, int] | None:
    """(base, size) of the device allocation that holds `ptr` (cuMemGetAddressRange, in the context the
    runtime made current); None when the driver library cannot say."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuMemGetAddressRange_v2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    fn.restype = ctypes.c_int
    base, size = ctypes.c_uint64(0), ctypes.c_size_t(0)
    if fn(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(ptr)) != 0:
        return None
    return int(base.value), int(size.value)


class DeviceStaging:
    def __init__(self, handle: bytes, size: int, stride: int, slots: int, device: int, arena: memoryview) -> None:
        if len(handle) != IPC_HANDLE_BYTES:
            raise R.invalid(f"a CUDA IPC memory handle is {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        if size != stride * slots:
            raise R.invalid(f"device staging of {size} bytes does not hold {slots} slots of {stride}")
        try:
            import cupy as cp
        except ImportError as exc:
            raise R.precondition(f"device staging needs CuPy in the daemon: {exc}") from None
        self.cp: Any = cp
        self.stride = stride
        self.slots = slots
        self.arena_base = int(np.frombuffer(arena, dtype=np.uint8).ctypes.data)
        self.arena_size = len(arena)
        self.registered = False
        try:
            self.device = cp.cuda.Device(device)
            self.device.use()
            self.ptr = int(cp.cuda.runtime.ipcOpenMemHandle(handle))
            self.stream = cp.cuda.Stream(non_blocking=True)
        except Exception as exc:
            raise R.precondition(f"cannot open the device staging through CUDA IPC: {exc}") from None
        span = _allocation_span(self.ptr)
        if span is not None and not (span[0] <= self.ptr and self.ptr + size <= span[0] + span[1]):
            with contextlib.suppress(Exception):
                cp.cuda.runtime.ipcCloseMemHandle(self.ptr)
            raise R.invalid(
                f"the exported device allocation holds {span[0] + span[1] - self.ptr} bytes, not the {size} declared"
            )
        try:  # page-locked arena: truly asynchronous copies; refused on CC-mode GPUs, then copies still work
            cp.cuda.runtime.hostRegister(self.arena_base, self.arena_size, 0)
            self.registered = True
        except Exception:
            self.registered = False
        self._events: dict[int, Any] = {}

    def prefetch(self, slot: int, arena_offset: int, nbytes: int) -> None:
        if not 0 <= slot < self.slots or nbytes > self.stride:
            return
        cp = self.cp
        with self.device:
            cp.cuda.runtime.memcpyAsync(
                self.ptr + slot * self.stride, self.arena_base + arena_offset, nbytes, _H2D, self.stream.ptr
            )
            ev = cp.cuda.Event(disable_timing=True)
            ev.record(self.stream)
        self._events[slot] = ev

    def ready(self, slot: int) -> bool:
        """True when that slot's copy has finished (never waits)."""
        ev = self._events.pop(slot, None)
        return ev is not None and bool(ev.done)

    def close(self) -> None:
        cp = self.cp
        with contextlib.suppress(Exception):
            self.stream.synchronize()
        with contextlib.suppress(Exception):
            cp.cuda.runtime.ipcCloseMemHandle(self.ptr)
        if self.registered:
            with contextlib.suppress(Exception):
                cp.cuda.runtime.hostUnregister(self.arena_base)
        self._events.clear()
