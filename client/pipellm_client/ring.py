"""The delivery ring: ciphertext the daemon has made ready, published in IV order for the SDK to take at once.

A hit then costs the serving process no round trip: it reads the record at the consumer index, checks that
it is the chunk it wants and that its source is unchanged, hands the slot to the endpoint, advances the
index and rings a doorbell (an eventfd write, which never waits). The daemon learns from the index which
slots are free again. A record the SDK cannot take (another chunk, stale, nothing published yet) sends it
down the slow path: a Commit frame, whose Completion consumes the remaining records in order.

Trust boundary: records are control data (which slot holds which chunk, in which order), so they live in a
memfd shared only by the daemon and the serving process, never in the bounce arena. A host that could
rewrite a record could make the endpoint accept authentic ciphertext of one chunk as another; rewriting
the arena can only make a tag check fail. The daemon keeps its own copy of every record it published and
trusts only the consumer index from this memory, which it checks.

Layout: a 64-byte header (produced: u64 at 0, written by the daemon; consumed: u64 at 8, written by the
SDK; bell_wanted: u64 at 16, set by the daemon when it waits for records to be taken), then `capacity`
records of 64 bytes (`RECORD`). The SDK writes the doorbell when `bell_wanted` is set and at most
`BELL_EVERY` records are left, and at least every `BELL_EVERY` records taken, so a busy serving loop makes
a system call only now and then. (A wake-up lost to
the two processes' unfenced stores costs nothing worse than a slow-path commit, which wakes the daemon.)
"""

from __future__ import annotations

import struct
import sys
from typing import Final, NamedTuple

import xxhash

from .shm import round_up

HEADER: Final = 64
RECORD: Final = struct.Struct("<IIIIQQQQQ8x")  # kind, ce, slot, flags, region, offset, length, digest, value
KIND_DATA: Final = 1  # = pb.MSG_KIND_DATA
KIND_ROTATE_IV: Final = 4  # = pb.MSG_KIND_ROTATE_IV
KIND_ROTATE_KEY: Final = 5  # = pb.MSG_KIND_ROTATE_KEY
FLAG_STAGED: Final = 1  # the ciphertext is already in device staging (CUDA endpoints)
BELL_EVERY: Final = 8


class Record(NamedTuple):
    kind: int
    ce: int
    slot: int
    flags: int
    region: int
    offset: int
    length: int
    digest: int  # `source_digest` of the write generations the daemon's ciphertext was made from
    value: int  # new chan_ctr (ROTATE_IV) or key version (ROTATE_KEY)


def ring_bytes(capacity: int) -> int:
    return round_up(HEADER + capacity * RECORD.size)


def source_digest(generations: bytes) -> int:
    """What both ends compare to know a chunk's source is unchanged: a hash of its write generations."""
    return xxhash.xxh3_64_intdigest(generations)


class _HeaderWord:
    """One u64 of a ring's header, read and written in place in the shared memory, whole: the other process
    reads it at any moment. One aligned 8-byte load or store (a 'Q' memoryview item), never `struct`'s
    pack_into, which zeroes the bytes before it writes them: a reader in between would see 0 or half a
    value (a consumer index gone backwards, records unpublished)."""

    def __init__(self, offset: int) -> None:
        self.index = offset // 8

    def __get__(self, ring: RingView, owner: type | None = None) -> int:
        return ring.words[self.index]

    def __set__(self, ring: RingView, value: int) -> None:
        ring.words[self.index] = int(value)


class RingView:
    """Both ends' view of one ring in shared memory (the daemon produces, the SDK consumes)."""

    def __init__(self, view: memoryview, capacity: int) -> None:
        if capacity < 1 or len(view) < ring_bytes(capacity):
            raise ValueError(f"a ring of {capacity} records needs {ring_bytes(capacity)} bytes, got {len(view)}")
        if sys.byteorder != "little":
            raise ValueError("the delivery ring's header is little-endian u64 words")
        self.view = view
        self.capacity = capacity
        self.words = view[:HEADER].cast("Q")  # the header as native u64 words (aligned: the ring is mapped)

    def release(self) -> None:
        """Drop the header view this object made (before its owner closes the shared memory)."""
        self.words.release()

    produced = _HeaderWord(0)  # written by the daemon
    consumed = _HeaderWord(8)  # written by the SDK
    bell_wanted = _HeaderWord(16)  # nonzero: the daemon waits for records to be taken

    def record(self, index: int) -> Record:
        return Record(*RECORD.unpack_from(self.view, HEADER + (index % self.capacity) * RECORD.size))

    def write(self, index: int, rec: Record) -> None:
        RECORD.pack_into(self.view, HEADER + (index % self.capacity) * RECORD.size, *rec)
