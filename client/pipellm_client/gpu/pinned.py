"""Pinned host memory for DMA between the bounce arena and the GPU, decided in one function.

`pin_host_memory` page-locks the shared arena with cudaHostRegister, so the GPU DMAs straight from the
memory the daemon wrote. Real CC-mode GPUs refuse cudaHostRegister (vllm-project/vllm#55428); there, and
wherever else it fails, a cudaHostAlloc staging buffer takes its place: bytes are copied into it on the
CPU, then DMA'd. Set PIPELLM_PIN_STRATEGY=staging to force the fallback (tests do).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import numpy as np

_H2D = 1  # cudaMemcpyHostToDevice
_D2H = 2  # cudaMemcpyDeviceToHost


def _cupy() -> Any:
    from . import aesgcm_cuda

    return aesgcm_cuda._cupy()  # one import point, so tests can substitute an emulated CuPy


def host_address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if len(view) else 0


class PinnedHost:
    """How this process moves bytes between host memory and the device; `strategy` says which way."""

    def __init__(self, base: int, size: int, strategy: str, staging_bytes: int) -> None:
        self.base = base
        self.size = size
        self.strategy = strategy
        self._staging: Any = None
        self._staging_np: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        if strategy == "staging":
            cp = _cupy()
            self._staging = cp.cuda.alloc_pinned_memory(staging_bytes)  # cudaHostAlloc
            self._staging_np = np.frombuffer(self._staging, dtype=np.uint8, count=staging_bytes)

    def _staged(self, n: int) -> tuple[int, np.ndarray[Any, np.dtype[np.uint8]]]:
        assert self._staging_np is not None
        if n > self._staging_np.size:
            raise ValueError(f"a message of {n} bytes exceeds the {self._staging_np.size}-byte pinned staging")
        return int(self._staging_np.ctypes.data), self._staging_np[:n]

    def to_device(self, src: memoryview, dst: Any, stream: Any) -> None:
        """Queue host -> device; in staging mode the CPU copy happens first, then the DMA."""
        cp = _cupy()
        n = len(src)
        if n == 0:
            return
        if self.strategy == "registered":
            ptr = host_address(src)
        else:
            stream.synchronize()  # the staging buffer may still feed a previous copy
            ptr, stage = self._staged(n)
            stage[:] = np.frombuffer(src, dtype=np.uint8)
        cp.cuda.runtime.memcpyAsync(int(dst.data.ptr), ptr, n, _H2D, stream.ptr)

    def to_host(self, src: Any, dst: memoryview, stream: Any) -> None:
        """Device -> host, complete when it returns."""
        cp = _cupy()
        n = len(dst)
        if n == 0:
            return
        if self.strategy == "registered":
            cp.cuda.runtime.memcpyAsync(host_address(dst), int(src.data.ptr), n, _D2H, stream.ptr)
            stream.synchronize()
        else:
            ptr, stage = self._staged(n)
            cp.cuda.runtime.memcpyAsync(ptr, int(src.data.ptr), n, _D2H, stream.ptr)
            stream.synchronize()
            np.frombuffer(dst, dtype=np.uint8)[:] = stage

    def close(self) -> None:
        if self.strategy == "registered" and self.base:
            with contextlib.suppress(Exception):
                _cupy().cuda.runtime.hostUnregister(self.base)
            self.base = 0
        self._staging = None
        self._staging_np = None


def pin_host_memory(view: memoryview, staging_bytes: int) -> PinnedHost:
    """THE place host memory gets pinned: cudaHostRegister where allowed, else cudaHostAlloc staging."""
    base, size = host_address(view), len(view)
    if os.environ.get("PIPELLM_PIN_STRATEGY", "register") != "staging":
        cp = _cupy()
        try:
            cp.cuda.runtime.hostRegister(base, size, 0)  # cudaHostRegisterDefault
            return PinnedHost(base, size, "registered", staging_bytes)
        except Exception:  # CUDARuntimeError, e.g. 801 on CC-mode GPUs
            pass
    return PinnedHost(base, size, "staging", staging_bytes)
