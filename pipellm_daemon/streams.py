"""One copy engine's state in a session: its keys as the workers know them, its sender or receiver, and
for the speculative engine the queue of entries in reserved-IV order."""

from __future__ import annotations

import asyncio
import enum
from collections import deque

from pipellm_client.channel import KEY_RING_SIZE, PredictingReceiver, ReservedIv, Sender

from .predictors import ChunkId
from .regions import Region
from .workers import WorkerPool


class State(enum.IntEnum):
    RESERVED = 0  # IV fresh, nothing encrypted yet
    ENCRYPTING = 1
    READY = 2
    FAILED = 3  # the worker died mid-job: partial ciphertext under this IV; only a rotation can retire it
    PUBLISHED = 4  # READY and in the delivery ring: its IV is submitted, only consuming or DISCARD retires it


class Entry:
    __slots__ = ("fingerprint", "fut", "iv", "key", "region", "slot", "snapshot", "source", "state")

    def __init__(self, key: ChunkId, region: Region, iv: ReservedIv, source: str = "") -> None:
        self.key = key
        self.source = source
        self.region = region
        self.iv = iv
        self.state = State.RESERVED
        self.slot = -1
        self.fut: asyncio.Future[None] | None = None
        self.snapshot: bytes | None = None
        self.fingerprint: int | None = None

    @property
    def nbytes(self) -> int:
        return self.key.length


class _KeyedStream:
    """One copy engine's keys as the crypto workers know them: a worker key id per key version in use."""

    def __init__(self, ce: int, version: int, key: bytes, workers: WorkerPool) -> None:
        self.ce = ce
        self.workers = workers
        self.key_ids: dict[int, int] = {version: workers.add_key(key)}

    def _add_key(self, version: int, key: bytes, *, keep: int) -> None:
        """Hand the workers key `version`; drop the ids of versions `keep` or more behind it."""
        self.key_ids[version] = self.workers.add_key(key)
        for old in [k for k in self.key_ids if k <= version - keep]:
            self.workers.drop_key(self.key_ids.pop(old))

    def _drop_keys(self) -> None:
        for kid in self.key_ids.values():
            self.workers.drop_key(kid)
        self.key_ids.clear()


class H2DStream(_KeyedStream):
    """One copy engine's H2D sender and, for the speculative engine, its queue."""

    def __init__(self, ce: int, sender: Sender, workers: WorkerPool) -> None:
        super().__init__(ce, sender.epoch.version, sender.epoch.key_bytes(), workers)
        self.sender = sender
        self.queue: deque[Entry] = deque()

    def key_id(self) -> int:
        return self.key_ids[self.sender.epoch.version]

    def find(self, key: ChunkId) -> int:
        for i, e in enumerate(self.queue):
            if e.key == key:
                return i
        return -1

    def install_new_key(self) -> None:
        # keep one old version for jobs still queued
        self._add_key(self.sender.epoch.version, self.sender.epoch.key_bytes(), keep=2)

    def close(self) -> None:
        self._drop_keys()
        self.sender.close()


class D2HStream(_KeyedStream):
    def __init__(self, ce: int, receiver: PredictingReceiver, workers: WorkerPool) -> None:
        super().__init__(ce, receiver.epoch.version, receiver.epoch.key_bytes(), workers)
        self.receiver = receiver

    def rotate_key(self) -> int:
        v = self.receiver.rotate_key()
        self._add_key(v, self.receiver.epoch.key_bytes(), keep=KEY_RING_SIZE)  # the versions it still opens
        return v

    def close(self) -> None:
        self._drop_keys()
        self.receiver.close()
