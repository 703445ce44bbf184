"""Shared memory the serving process and the daemon both map: memfds, sealing, write protection.

Regions and bounce arenas are memfds so they can be passed over a Unix socket (SCM_RIGHTS) and sealed.
A peer that resizes a memfd someone else has mapped turns that side's next access into SIGBUS (for the
daemon: every tenant at once), so every memfd here is created with F_SEAL_SHRINK | F_SEAL_GROW, and
`attach` maps nothing else: only memfds, only with both size seals. Writable attachments also get
F_SEAL_SEAL (the seal set is frozen), so no later seal can stop a restarted crypto worker from mapping them.

A read-only region is sealed with F_SEAL_WRITE, not F_SEAL_FUTURE_WRITE: FUTURE_WRITE leaves mappings made
before it writable (and `mprotect` makes a read-only one writable again), while the kernel refuses WRITE
(EBUSY) as long as any shared mapping exists that may write, and once it is set nothing can write: not
write(2), not a new mapping, not `mprotect`. On 6.x kernels even a PROT_READ mapping of an O_RDWR file
"may write" (VM_MAYWRITE), so everyone maps a read-only region from an O_RDONLY reopen of the memfd
(`reopen_readonly`), and `seal_readonly` swaps the owner's writable mapping in place for such a read-only
one (MAP_FIXED at the same address: numpy arrays and torch tensors over it stay valid and fault on write).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import stat
from typing import Final

from . import keymem
from .errors import InvalidArgument

PAGE: Final = mmap.PAGESIZE
F_ADD_SEALS: Final = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS: Final = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL: Final = 0x1
F_SEAL_SHRINK: Final = 0x2
F_SEAL_GROW: Final = 0x4
F_SEAL_WRITE: Final = 0x8
F_SEAL_FUTURE_WRITE: Final = 0x10
SIZE_SEALS: Final = F_SEAL_SHRINK | F_SEAL_GROW
READONLY_SEALS: Final = SIZE_SEALS | F_SEAL_WRITE | F_SEAL_SEAL
_MADV_POPULATE_WRITE: Final = 23
_PROT_READ: Final = 1
_PROT_WRITE: Final = 2
_MAP_SHARED: Final = 0x01
_MAP_FIXED: Final = 0x10
_HUGETLBFS_MAGIC: Final = 0x958458F6

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def round_up(n: int, align: int = PAGE) -> int:
    return -(-n // align) * align


def address_of(buf: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _seal_names(seals: int) -> str:
    names = [("F_SEAL_SHRINK", F_SEAL_SHRINK), ("F_SEAL_GROW", F_SEAL_GROW), ("F_SEAL_WRITE", F_SEAL_WRITE)]
    return " | ".join(n for n, bit in names if seals & bit) or "none"


def _not_a_memfd(mode: int) -> InvalidArgument:
    kinds = [
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISFIFO, "pipe"),
        (stat.S_ISCHR, "character device (e.g. /dev/zero)"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISDIR, "directory"),
    ]
    kind = next((name for test, name in kinds if test(mode)), "regular file")
    return InvalidArgument(f"the fd is a {kind}, not a memfd; shared memory must be a memfd_create(2) file")


def _fs_magic(fd: int) -> int | None:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field, a long
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def check_memfd(fd: int) -> int:
    """Refuse anything but a plain (shmem) memfd; returns its seals. Other fds can SIGBUS or lie about size."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise InvalidArgument(f"the fd cannot be inspected: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_memfd(st.st_mode)
    try:
        seals = fcntl.fcntl(fd, F_GET_SEALS)
    except OSError:
        raise _not_a_memfd(st.st_mode) from None  # a file on a filesystem without seals
    with contextlib.suppress(OSError):
        link = os.readlink(f"/proc/self/fd/{fd}")
        if not link.startswith("/memfd:"):
            raise InvalidArgument(f"the fd is a shared-memory file ({link}), not a memfd")
    if _fs_magic(fd) == _HUGETLBFS_MAGIC:
        # A hole punched in a hugetlb memfd is refilled from the huge page pool on the next fault, and an
        # empty pool answers that fault with SIGBUS: the peer could still kill us without resizing.
        raise InvalidArgument("the fd is a hugetlb memfd; only regular memfds are accepted")
    return seals


def freeze_seals(fd: int) -> int:
    """Add F_SEAL_SEAL (needs a writable fd) and return the final seals: checks made after it cannot race."""
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    if not seals & F_SEAL_SEAL:
        with contextlib.suppress(PermissionError):  # a read-only fd, or the peer froze them first
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SEAL)
        seals = fcntl.fcntl(fd, F_GET_SEALS)
        if not seals & F_SEAL_SEAL:
            raise InvalidArgument("the fd is not open for writing, so it cannot be shared writable")
    return seals


def reopen_readonly(fd: int) -> int:
    """A new O_RDONLY file description of the same memfd: its mappings cannot become writable (EACCES)
    and do not block F_SEAL_WRITE, unlike a PROT_READ mapping of the O_RDWR one."""
    try:
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"the memfd cannot be reopened read-only: {exc.strerror}") from None
    a, b = os.fstat(fd), os.fstat(ro)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        os.close(ro)
        raise InvalidArgument("reopening the memfd read-only gave a different file")
    return ro


def _map_fixed(addr: int, length: int, prot: int, fd: int) -> None:
    got = _libc.mmap(addr, length, prot, _MAP_SHARED | _MAP_FIXED, fd, 0)
    if got == _MAP_FAILED or got != addr:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap over the region failed: {os.strerror(err)}")


class SharedMemory:
    """One memfd and this process's mapping of it."""

    def __init__(self, fd: int, size: int, *, writable: bool) -> None:
        self.fd = fd
        self.size = size
        self.writable = writable
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.buf = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        keymem.exempt(self.buf, size)  # shared data is never key material: not pinned by mlockall
        self.view = memoryview(self.buf)
        self.closed = False

    @classmethod
    def create(cls, name: str, size: int) -> SharedMemory:
        """A fixed-size memfd: sealed against shrinking and growing before anybody else can see it."""
        if size <= 0:
            raise InvalidArgument(f"shared memory size must be > 0, got {size}")
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, F_ADD_SEALS, SIZE_SEALS)
            return cls(fd, size, writable=True)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, size: int, *, writable: bool) -> SharedMemory:
        """Map a memfd received from a peer, only once it can no longer change size under the mapping.

        Checks, in this order: a memfd; both size seals; writable ones get their seals frozen and must not
        be write-sealed; the size the peer announced. Read-only ones are mapped from an O_RDONLY reopen, so
        the owner can still seal them with F_SEAL_WRITE. On success the new object owns `fd`; on failure
        the caller still does.
        """
        seals = check_memfd(fd)
        missing = SIZE_SEALS & ~seals
        if missing:
            raise InvalidArgument(
                f"the memfd lacks {_seal_names(missing)}: its owner could resize it under our mapping"
                " (create it with MFD_ALLOW_SEALING and add F_SEAL_SHRINK | F_SEAL_GROW)"
            )
        if writable:
            seals = freeze_seals(fd)  # size seals cannot be removed: checking them first was not a race
            if seals & (F_SEAL_WRITE | F_SEAL_FUTURE_WRITE):
                raise InvalidArgument("the memfd is sealed against writes; it cannot be shared writable")
        actual = os.fstat(fd).st_size
        if actual != size:
            raise InvalidArgument(f"shared memory is {actual} bytes, {size} were announced")
        if writable:
            return cls(fd, size, writable=True)
        ro = reopen_readonly(fd)
        try:
            shm = cls(ro, size, writable=False)
        except BaseException:
            os.close(ro)
            raise
        os.close(fd)
        return shm

    def prefault(self) -> None:
        """Touch every page now, so first-touch cost (≈1 GB/s) never lands on the critical path."""
        try:
            self.buf.madvise(_MADV_POPULATE_WRITE)
        except OSError:
            for off in range(0, self.size, PAGE):
                self.buf[off] = 0

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, F_GET_SEALS)

    def freeze(self) -> None:
        """No seal can be added any more: a peer we hand this fd to cannot write-seal it under our workers."""
        freeze_seals(self.fd)

    def seal_readonly(self) -> None:
        """Make the bytes immutable for everyone: swap this mapping for a read-only one, then F_SEAL_WRITE.

        Raises InvalidArgument (and leaves the memory writable and unsealed) if another writable mapping
        or a pinned page of the memfd still exists anywhere: the kernel answers EBUSY.
        """
        if not self.writable:
            if is_sealed_readonly(self.fd):
                return
            raise InvalidArgument("this mapping is read-only; only the memfd's owner can seal it")
        ro = reopen_readonly(self.fd)
        addr, length = address_of(self.buf), round_up(self.size)
        try:
            _map_fixed(addr, length, _PROT_READ, ro)
        except BaseException:
            os.close(ro)
            raise
        try:
            fcntl.fcntl(self.fd, F_ADD_SEALS, READONLY_SEALS)
        except OSError as exc:
            _map_fixed(addr, length, _PROT_READ | _PROT_WRITE, self.fd)  # back as it was: still usable
            os.close(ro)
            if exc.errno == errno.EBUSY:
                raise InvalidArgument(
                    "cannot seal: another writable mapping (or a pinned page) of this memory exists"
                ) from None
            raise InvalidArgument(f"cannot seal: F_ADD_SEALS failed: {exc.strerror}") from None
        os.close(self.fd)  # nothing may write any more; keep only the read-only description
        self.fd = ro
        self.writable = False
        old, self.view = self.view, memoryview(self.buf).toreadonly()
        with contextlib.suppress(BufferError):
            old.release()

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
    """F_SEAL_WRITE and both size seals: no process can change these bytes any more."""
    need = F_SEAL_WRITE | SIZE_SEALS
    return fcntl.fcntl(fd, F_GET_SEALS) & need == need
