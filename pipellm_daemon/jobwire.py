"""The protocol between the daemon and its crypto workers (internal; fixed-size records).

Kept apart from the public protobuf contract: jobs cross tens of thousands of times per second and must
cost microseconds, and nothing outside this host ever sees them.

Each worker has a private memfd (`Ring`) holding two rings of fixed-size records: jobs (daemon -> worker)
and completions (worker -> daemon), and two eventfds, one per direction. Nothing in the ring is trusted
to say how many records are new: a producer writes its records, then adds their number to the eventfd,
and a consumer reads exactly as many records as it has taken from the eventfd. The eventfd's lock in the
kernel orders the record bytes before the count on any architecture, so no shared index is ever read
half-written or ahead of its record, and no wake-up is lost (a count added while the consumer is busy is
simply there when it looks). Job `i` lives in slot `i % slots` of the job ring and its completion in the
same slot of the completion ring; the daemon writes job `i` only once it has read completion `i - slots`,
so neither ring can overrun its reader.

Control operations (maps with their fd, keys) travel over the worker's SOCK_SEQPACKET socketpair, as
before, each followed by a CONTROL record in the job ring at the point where it must take effect: the
worker reads the socket message when it reaches that record, so a map comes before the jobs that use it
and an unmap or key drop after the jobs submitted before it. Keys never enter the ring's memory.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
from typing import Final, NamedTuple


class Op(enum.IntEnum):
    MAP = 1  # + one fd: make a handle for shared memory
    UNMAP = 2
    KEY = 3  # install a key under an id (keys cross only the private socketpair)
    DROP_KEY = 4
    JOB = 5  # a job record (in the ring)
    CONTROL = 6  # a ring record: the next control message is on the socket; apply it now


class Kind(enum.IntEnum):
    SEAL = 1  # encrypt region bytes into a bounce slot
    OPEN = 2  # decrypt a bounce slot into a region (D2H)


URGENT: Final = 0x80  # or-ed into a job's kind: announce its completion at once, never held back
KIND_MASK: Final = 0x7F


class Status(enum.IntEnum):
    OK = 0
    TAG = 1  # authentication failed; destination wiped
    ERROR = 2  # bad handle or range; a daemon bug, reported loudly


MAP: Final = struct.Struct("<BIQB")
HANDLE: Final = struct.Struct("<BI")
KEY: Final = struct.Struct("<BI32s")
# op, kind, job id, key id, nonce, src handle, src offset, length, dst handle, dst offset
JOB: Final = struct.Struct("<BBQI12sIQIIQ")
# job id (0 for a CONTROL record), busy ns, status
DONE: Final = struct.Struct("<QQB")
JOB_SLOT: Final = 64
DONE_SLOT: Final = 32
RING_SLOTS: Final = 4096  # jobs in flight per worker (more wait in the pool); >= window / job overhead
CONTROL_RECORD: Final = JOB.pack(Op.CONTROL, 0, 0, 0, bytes(12), 0, 0, 0, 0, 0)


class Job(NamedTuple):
    kind: Kind
    job_id: int
    key_id: int
    nonce: bytes
    src_handle: int
    src_offset: int
    length: int  # plaintext length
    dst_handle: int
    dst_offset: int

    def pack(self) -> bytes:
        return JOB.pack(Op.JOB, self.kind, *self[1:])

    @classmethod
    def unpack_from(cls, data: bytes | memoryview | mmap.mmap, offset: int) -> Job:
        _op, kind, *rest = JOB.unpack_from(data, offset)
        return cls(Kind(kind), *rest)


class Ring:
    """One worker's rings: `slots` job records, then `slots` completion records, in one memfd.

    The daemon creates it (`create`) and passes the memfd and both eventfds to the worker, which maps
    them (`attach`). `job_efd` counts job records written by the daemon, `done_efd` completion records
    written by the worker; both are non-blocking.
    """

    def __init__(self, fd: int, job_efd: int, done_efd: int, slots: int) -> None:
        self.fd, self.job_efd, self.done_efd, self.slots = fd, job_efd, done_efd, slots
        self.done_base = slots * JOB_SLOT
        self.size = self.done_base + slots * DONE_SLOT
        self.mem = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    @classmethod
    def create(cls, slots: int = RING_SLOTS) -> Ring:
        fd = os.memfd_create("pipellm-worker-ring", os.MFD_CLOEXEC)
        efds: list[int] = []
        try:
            os.ftruncate(fd, slots * (JOB_SLOT + DONE_SLOT))
            for _ in range(2):
                efds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            return cls(fd, efds[0], efds[1], slots)
        except BaseException:
            for f in (fd, *efds):
                os.close(f)
            raise

    def fds(self) -> list[int]:
        return [self.fd, self.job_efd, self.done_efd]

    def close(self) -> None:
        if self.mem.closed:
            return
        self.mem.close()
        for f in self.fds():
            os.close(f)
