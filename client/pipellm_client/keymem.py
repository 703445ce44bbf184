"""Key bytes in memory that is locked, kept out of core dumps and wiped on close (best effort).

Python copies bytes freely and OpenSSL keeps its own key schedule, so this cannot promise that no
other copy exists; it keeps the long-lived copy we control off swap and out of dumps, and zeroes it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
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


def protection() -> dict[str, bool]:
    """What the platform granted, for status output (never the keys)."""
    with _lock:
        if not _arenas:
            _arenas.append(_Arena())
        return {"mlock": all(a.locked for a in _arenas), "dontdump": all(a.dontdump for a in _arenas)}


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
