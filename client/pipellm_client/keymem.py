"""Key bytes in memory that is locked, kept out of core dumps and wiped on close (best effort).

Python copies bytes freely and OpenSSL keeps its own key schedule, so this cannot promise that no
other copy exists; it keeps the long-lived copy we control off swap and out of dumps, and zeroes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import resource
import threading
from typing import Final

_PAGE: Final = mmap.PAGESIZE
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Arena:
    """A few locked pages shared by many small keys; slots are handed out and wiped on free."""

    def __init__(self, size: int = _PAGE * 4) -> None:
        self.size = size
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.locked = False
        self.dontdump = False
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        if _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) == 0:
            self.locked = True
        try:
            self.buf.madvise(getattr(mmap, "MADV_DONTDUMP", 16))
            self.dontdump = True
        except OSError:
            pass
        self.free = list(range(0, size, 64))


_lock = threading.RLock()  # re-entrant: a GC-triggered __del__ may wipe a key while __init__ holds it
_arenas: list[_Arena] = []
_all_memory_locked = False

_MCL_CURRENT: Final = 1
_MCL_FUTURE: Final = 2
_MCL_ONFAULT: Final = 4
_CAP_IPC_LOCK: Final = 14


def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def may_lock_all_memory() -> bool:
    """mlockall is safe only without a locked-memory limit: under a finite RLIMIT_MEMLOCK, MCL_FUTURE would
    make every later mmap of a large region or arena fail once the limit is reached."""
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return soft == resource.RLIM_INFINITY or _has_cap_ipc_lock()


def lock_all_memory() -> bool:
    """Lock every page of this process, now and later, as it is touched (MCL_ONFAULT: no up-front cost).

    The pages that hold key bytes we control are locked anyway (`LockedKey`); this also covers the copies we
    do not control: OpenSSL's key schedules, `bytes` returned by `reveal()`, cipher objects. Returns whether
    it was done; it is attempted only where `may_lock_all_memory()` (the daemon and its workers, whose
    limits are the same, so they reach the same answer).
    """
    global _all_memory_locked
    if not may_lock_all_memory():
        return False
    if _libc.mlockall(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT) != 0:
        return False
    _all_memory_locked = True
    return True


def exempt(buf: mmap.mmap, size: int) -> None:
    """Unlock a shared mapping (a region or an arena) that `lock_all_memory` locked as it was made.

    They hold data and ciphertext, never keys; locking them would pin up to every tenant's region bytes
    in RAM with no limit (the limit is infinite exactly when we lock all memory).
    """
    if _all_memory_locked and size > 0:
        _libc.munlock(ctypes.c_void_p(_address(buf)), ctypes.c_size_t(size))


class _PyBuffer(ctypes.Structure):
    _fields_ = (
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    )


def _address(buf: mmap.mmap) -> int:
    """The start address of a mapping, read-only ones included (ctypes' from_buffer needs a writable one)."""
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(buf), ctypes.byref(view), 0) != 0:
        raise BufferError("no buffer")
    try:
        return int(view.buf or 0)
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def protection() -> dict[str, bool]:
    """What the platform granted, for status output (never the keys).

    `mlock`/`dontdump`: the key pages we allocate are locked and kept out of core dumps. `all_memory`: the
    whole process is locked (`lock_all_memory`), so every copy of a key, ours or OpenSSL's, stays off swap.
    """
    with _lock:
        if not _arenas:
            _arenas.append(_Arena())
        return {
            "mlock": all(a.locked for a in _arenas),
            "dontdump": all(a.dontdump for a in _arenas),
            "all_memory": _all_memory_locked,
        }


class LockedKey:
    """Up to 64 bytes of secret in a locked, non-dumpable slot. `repr` never shows the bytes."""

    __slots__ = ("_arena", "_len", "_off")

    def __init__(self, secret: bytes | bytearray) -> None:
        if not 0 < len(secret) <= 64:
            raise ValueError("LockedKey holds 1..64 bytes")
        with _lock:
            arena = next((a for a in _arenas if a.free), None)
            if arena is None:
                arena = _Arena()
                _arenas.append(arena)
            self._off = arena.free.pop()
        self._arena = arena
        self._len = len(secret)
        arena.buf[self._off : self._off + self._len] = bytes(secret)

    def __len__(self) -> int:
        return self._len

    def reveal(self) -> bytes:
        """The key bytes, for handing to a cipher. Callers must not keep or print them."""
        if self._arena is None:
            raise ValueError("key was wiped")
        return self._arena.buf[self._off : self._off + self._len]

    def wipe(self) -> None:
        arena = self._arena
        if arena is None:
            return
        arena.buf[self._off : self._off + 64] = bytes(64)
        with _lock:
            arena.free.append(self._off)
        self._arena = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<LockedKey {self._len} bytes>"

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.wipe()
