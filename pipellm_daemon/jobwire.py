"""The binary protocol between the daemon and its crypto workers (internal; fixed-size records).

Kept apart from the public protobuf contract: these records cross a socketpair tens of thousands of
times per second and must cost microseconds, and nothing outside this host ever sees them.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, NamedTuple


class Op(enum.IntEnum):
    MAP = 1  # + one fd: make a handle for shared memory
    UNMAP = 2
    KEY = 3  # install a key under an id (keys cross only this private socketpair)
    DROP_KEY = 4
    JOB = 5  # one or more job records


class Kind(enum.IntEnum):
    SEAL = 1  # encrypt region bytes into a bounce slot
    OPEN = 2  # decrypt a bounce slot into a region (D2H)


class Status(enum.IntEnum):
    OK = 0
    TAG = 1  # authentication failed; destination wiped
    ERROR = 2  # bad handle or range; a daemon bug, reported loudly


MAP: Final = struct.Struct("<BIQB")
HANDLE: Final = struct.Struct("<BI")
KEY: Final = struct.Struct("<BI32s")
JOB: Final = struct.Struct("<BBQI12sIQIIQ")
DONE: Final = struct.Struct("<QBQ")
MAX_JOBS_PER_MESSAGE: Final = 64


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
    def unpack_from(cls, data: bytes | memoryview, offset: int) -> Job:
        _op, kind, *rest = JOB.unpack_from(data, offset)
        return cls(Kind(kind), *rest)
