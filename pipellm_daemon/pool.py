"""The bounce pool: per-session arenas of shared, untrusted memory, allocated and pre-faulted up front.

An arena is sealed (size fixed, seal set frozen) and pre-faulted before its session uses it, so a client
cannot resize it under a worker and the first-touch cost (≈1 GB/s) never lands on a transfer's critical
path. Slots within an arena are handed out by `SlotAllocator`, which applies backpressure: a caller that
needs a slot waits until the endpoint releases one.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pipellm_client.arena import ArenaLayout
from pipellm_client.shm import SharedMemory

from .errors import PoolExhausted


class SlotAllocator:
    """Free list of slot indices with FIFO waiters."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._free: deque[int] = deque(range(count))
        self._held: set[int] = set()
        self._waiters: deque[asyncio.Future[int]] = deque()

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def in_use(self) -> int:
        return len(self._held)

    def try_acquire(self) -> int | None:
        if not self._free:
            return None
        i = self._free.popleft()
        self._held.add(i)
        return i

    async def acquire(self) -> int:
        i = self.try_acquire()
        if i is not None:
            return i
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        return await fut

    def release(self, i: int) -> bool:
        """False when `i` was not held (a client releasing what it does not own)."""
        if i not in self._held:
            return False
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(i)
                return True
        self._held.discard(i)
        self._free.append(i)
        return True

    def cancel_waiters(self, exc: BaseException) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(exc)


class Arena:
    def __init__(self, layout: ArenaLayout, shm: SharedMemory, handle: int) -> None:
        self.layout = layout
        self.shm = shm
        self.handle = handle
        self.h2d = SlotAllocator(layout.h2d_slots)
        self.nops = SlotAllocator(layout.nop_cells)

    def nop_view(self, cell: int, length: int) -> memoryview:
        off = self.layout.nop_cell(cell)
        return self.shm.view[off : off + length]


class BouncePool:
    """Arenas are never handed to a second session: a client may keep its mapping after it leaves, and a
    later session's ciphertext must be out of its reach. One pre-faulted spare keeps session opens quick.
    """

    def __init__(self, layout: ArenaLayout, max_bytes: int, spares: int = 1) -> None:
        self.layout = layout
        self.max_arenas = max(1, max_bytes // layout.size)
        self.spares_wanted = min(spares, self.max_arenas)
        self._spares: list[SharedMemory] = []
        self.in_use = 0
        self.created = 0

    def _create(self) -> SharedMemory:
        """A pre-faulted arena whose seals are final before the client gets it: `create` sealed its size (a
        truncated arena SIGBUSes the worker that writes a slot, in a crash loop), and `freeze` stops the
        client from adding F_SEAL_FUTURE_WRITE, which would make every restarted worker's mapping fail."""
        shm = SharedMemory.create("pipellm-arena", self.layout.size)
        shm.prefault()
        shm.freeze()
        self.created += 1
        return shm

    def acquire(self) -> SharedMemory:
        if self.in_use >= self.max_arenas:
            raise PoolExhausted(
                f"bounce pool exhausted: {self.in_use} arenas of {self.layout.size} bytes in use (pool_bytes limit)"
            )
        shm = self._spares.pop() if self._spares else self._create()
        self.in_use += 1
        return shm

    def release(self, shm: SharedMemory) -> None:
        self.in_use -= 1
        shm.close()

    def replenish(self) -> None:
        """Make spares up to the target (blocking: run it off the event loop)."""
        while len(self._spares) < self.spares_wanted and self.in_use + len(self._spares) < self.max_arenas:
            self._spares.append(self._create())

    @property
    def allocated(self) -> int:
        return self.in_use + len(self._spares)

    def close(self) -> None:
        for shm in self._spares:
            shm.close()
        self._spares.clear()
