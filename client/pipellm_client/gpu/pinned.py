"""Pinned host memory for DMA between the bounce arena and the GPU, decided in one function.

`pin_host_memory` page-locks the shared arena with cudaHostRegister, so the GPU DMAs straight from the
memory the daemon wrote. Real CC-mode GPUs refuse cudaHostRegister (vllm-project/vllm#55428); there, and
wherever else it fails, a cudaHostAlloc staging buffer takes its place: bytes are copied into it on the
CPU, then DMA'd. Set PIPELLM_PIN_STRATEGY=staging to force the fallback (tests do).

The staging buffer has one region per message of a batch, so a batch's copies are all queued before one
wait; a region is rewritten only once the copy that last used it has completed (an event per region).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
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

    def __init__(self, base: int, size: int, strategy: str, staging_bytes: int, regions: int = 1) -> None:
        self.base = base
        self.size = size
        self.strategy = strategy
        self.region_bytes = staging_bytes
        self.regions = max(1, regions)
        self._staging: Any = None
        self._staging_np: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self._events: list[Any] = [None] * self.regions
        if strategy == "staging":
            cp = _cupy()
            total = staging_bytes * self.regions
            self._staging = cp.cuda.alloc_pinned_memory(total)  # cudaHostAlloc
            self._staging_np = np.frombuffer(self._staging, dtype=np.uint8, count=total)

    def _region(self, i: int, n: int) -> tuple[int, np.ndarray[Any, np.dtype[np.uint8]]]:
        """Staging region i, once the copy that last used it is complete."""
        assert self._staging_np is not None
        if n > self.region_bytes:
            raise ValueError(f"a message of {n} bytes exceeds the {self.region_bytes}-byte pinned staging")
        if not 0 <= i < self.regions:
            raise ValueError(f"pinned staging region {i} out of range 0..{self.regions - 1}")
        if self._events[i] is not None:
            self._events[i].synchronize()
            self._events[i] = None
        stage = self._staging_np[i * self.region_bytes : i * self.region_bytes + n]
        return int(stage.ctypes.data), stage

    def _used(self, i: int, stream: Any) -> None:
        event = _cupy().cuda.Event(disable_timing=True)
        event.record(stream)
        self._events[i] = event

    def to_device(self, src: memoryview, dst: Any, stream: Any, region: int = 0) -> None:
        """Queue host -> device; in staging mode the CPU copy into staging region `region` happens first."""
        cp = _cupy()
        n = len(src)
        if n == 0:
            return
        if self.strategy == "registered":
            cp.cuda.runtime.memcpyAsync(int(dst.data.ptr), host_address(src), n, _H2D, stream.ptr)
            return
        ptr, stage = self._region(region, n)
        stage[:] = np.frombuffer(src, dtype=np.uint8)
        cp.cuda.runtime.memcpyAsync(int(dst.data.ptr), ptr, n, _H2D, stream.ptr)
        self._used(region, stream)

    def to_host_many(self, pairs: Sequence[tuple[Any, memoryview]], stream: Any) -> None:
        """Device -> host for every (device array, host view) pair, one wait for all; complete on return."""
        cp = _cupy()
        todo = [(src, dst) for src, dst in pairs if len(dst)]
        for at in range(0, len(todo), self.regions):
            group = todo[at : at + self.regions]
            stages = []
            for i, (src, dst) in enumerate(group):
                n = len(dst)
                if self.strategy == "registered":
                    cp.cuda.runtime.memcpyAsync(host_address(dst), int(src.data.ptr), n, _D2H, stream.ptr)
                else:
                    ptr, stage = self._region(i, n)
                    cp.cuda.runtime.memcpyAsync(ptr, int(src.data.ptr), n, _D2H, stream.ptr)
                    stages.append((stage, dst))
            stream.synchronize()
            for stage, dst in stages:
                np.frombuffer(dst, dtype=np.uint8)[:] = stage

    def to_host(self, src: Any, dst: memoryview, stream: Any) -> None:
        """Device -> host, complete when it returns."""
        self.to_host_many([(src, dst)], stream)

    def close(self) -> None:
        if self.strategy == "registered" and self.base:
            with contextlib.suppress(Exception):
                _cupy().cuda.runtime.hostUnregister(self.base)
            self.base = 0
        self._events = [None] * self.regions
        self._staging = None
        self._staging_np = None


def pin_host_memory(view: memoryview, staging_bytes: int, regions: int = 1) -> PinnedHost:
    """THE place host memory gets pinned: cudaHostRegister where allowed, else cudaHostAlloc staging
    (`regions` regions of `staging_bytes`, one per message of a batch)."""
    base, size = host_address(view), len(view)
    if os.environ.get("PIPELLM_PIN_STRATEGY", "register") != "staging":
        cp = _cupy()
        try:
            cp.cuda.runtime.hostRegister(base, size, 0)  # cudaHostRegisterDefault
            return PinnedHost(base, size, "registered", staging_bytes, regions)
        except Exception:  # CUDARuntimeError, e.g. 801 on CC-mode GPUs
            pass
    return PinnedHost(base, size, "staging", staging_bytes, regions)
