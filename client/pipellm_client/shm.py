"""Shared memory the serving process and the daemon both map: memfds, sealing, write protection.

Regions and bounce arenas are memfds so they can be passed over a Unix socket (SCM_RIGHTS) and sealed.
A read-only region gets F_SEAL_FUTURE_WRITE (no new writable mapping, no write(2)) and its existing
mapping is mprotect-ed read-only, so a stray write faults instead of silently staling ciphertext.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import mmap
import os
from typing import Final

from .errors import InvalidArgument

PAGE: Final = mmap.PAGESIZE
F_ADD_SEALS: Final = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS: Final = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL: Final = 0x1
F_SEAL_SHRINK: Final = 0x2
F_SEAL_GROW: Final = 0x4
F_SEAL_WRITE: Final = 0x8
F_SEAL_FUTURE_WRITE: Final = 0x10
READONLY_SEALS: Final = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE
_MADV_POPULATE_WRITE: Final = 23
_PROT_READ: Final = 1

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def round_up(n: int, align: int = PAGE) -> int:
    return -(-n // align) * align


def address_of(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


class SharedMemory:
    """One memfd and this process's mapping of it."""

    def __init__(self, fd: int, size: int, *, writable: bool) -> None:
        self.fd = fd
        self.size = size
        self.writable = writable
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        self.view = memoryview(self.buf)
        self.closed = False

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        if size <= 0:
            raise InvalidArgument(f"shared memory size must be > 0, got {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, writable=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int, *, writable: bool) -> SharedMemory:
        """Map a memfd received from a peer; its real size must match what the peer claimed."""
        actual = os.fstat(fd).st_size
        if actual != size:
            raise InvalidArgument(f"shared memory is {actual} bytes, {size} were announced")
        return cls(fd, size, writable=writable)

    def prefault(self) -> None:
        """Touch every page now, so first-touch cost (≈1 GB/s) never lands on the critical path."""
        try:
            self.buf.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            for off in range(0, self.size, PAGE):
                self.buf[off] = 0

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, F_GET_SEALS)

    def seal_readonly(self) -> None:
        """Forbid every future write to the memfd and make this mapping read-only."""
        fcntl.fcntl(self.fd, F_ADD_SEALS, READONLY_SEALS)
        if _libc.mprotect(address_of(self.buf), round_up(self.size), _PROT_READ) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mprotect read-only failed: {os.strerror(err)}")
        self.writable = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.view.release()
        # Somebody may still hold a view (a numpy array, say); the mapping then lives until they drop it.
        with contextlib.suppress(BufferError):
            self.buf.close()
        os.close(self.fd)


def is_sealed_readonly(fd: int) -> bool:
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    return bool(seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE)) and bool(seals & F_SEAL_SHRINK)
