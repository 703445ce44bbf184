"""A host region as the daemon sees it: the client's memfd mapped here and in every worker.

Read-only regions are valid forever once sealed with F_SEAL_WRITE (the kernel then refuses every write,
through any mapping or fd), and worth nothing before: until then the owner may still be filling them, so
nothing is encrypted from them ahead of time (`generations` is None). The daemon and its workers map them
from an O_RDONLY reopen of the memfd, which is what lets the owner add F_SEAL_WRITE. Mutable regions
carry a table of write generations after their data, one per granule, used as a seqlock: a writer makes
a granule odd while it writes and even after, so ciphertext made from an even snapshot that is still the
current snapshot at commit time was made from exactly the bytes being committed.
"""

from __future__ import annotations

import asyncio

import numpy as np
import xxhash
from pipellm_client.errors import InvalidArgument
from pipellm_client.regions import RegionBase
from pipellm_client.shm import SharedMemory, is_sealed_readonly


class Region(RegionBase):
    def __init__(
        self,
        region_id: int,
        name: str,
        shm: SharedMemory,
        size: int,
        readonly: bool,
        granule: int,
        handle: int,
    ) -> None:
        super().__init__(region_id, name, shm, size, readonly, granule)
        self.handle = handle
        self.pending_writes: list[tuple[int, int, asyncio.Future[None]]] = []
        # granule -> D2H landings writing into it now. Two landings into disjoint bytes of one granule run
        # at once; the granule's generation must stay odd until the last of them ends (one +1 each way).
        self._writers: dict[int, int] = {}

    def view(self, offset: int, length: int) -> memoryview:
        return self.shm.view[offset : offset + length]

    # -- validation ------------------------------------------------------------------------------
    def unchanged_since(self, snapshot: bytes, offset: int, length: int) -> bool:
        return self.readonly or self.generations(offset, length) == snapshot

    def fingerprint(self, offset: int, length: int) -> int:
        return xxhash.xxh3_64_intdigest(self.view(offset, length))

    def begin_write(self, offset: int, length: int) -> None:
        """The daemon writes a D2H result here: make the granules odd (stale for any snapshot)."""
        if self.gens is None:
            return
        for g in self.granules(offset, length):
            n = self._writers.get(g, 0)
            if n == 0:
                self.gens[g] += np.uint64(1)
            self._writers[g] = n + 1

    def end_write(self, offset: int, length: int) -> None:
        """A landing is over: a granule turns even again (a new generation) when its last writer is done."""
        if self.gens is None:
            return
        for g in self.granules(offset, length):
            n = self._writers.pop(g, 0) - 1
            if n > 0:
                self._writers[g] = n
            else:
                self.gens[g] += np.uint64(1)

    def overlapping_writes(self, offset: int, length: int) -> list[asyncio.Future[None]]:
        """Landings into these bytes (two D2H transfers into the same bytes may not land at once)."""
        end = offset + length
        return [f for (o, n, f) in self.pending_writes if o < end and offset < o + n and not f.done()]

    def landings_touching(self, offset: int, length: int) -> list[asyncio.Future[None]]:
        """Landings into any granule of these bytes: a reader waits for them, since until they end the
        granules' generations are odd and nothing there can be validated."""
        if self.gens is None:
            return self.overlapping_writes(offset, length)
        lo = offset // self.granule * self.granule
        hi = -(-(offset + length) // self.granule) * self.granule
        return self.overlapping_writes(lo, hi - lo)

    def seal(self) -> None:
        if not self.readonly:
            raise InvalidArgument(f"region {self.id} is mutable; only read-only regions are sealed")
        if not is_sealed_readonly(self.shm.fd):
            # F_SEAL_FUTURE_WRITE is not enough: mappings made before it stay writable.
            raise InvalidArgument(
                f"region {self.id}: the memfd is not sealed with F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW;"
                " seal it first (Region.seal() in the SDK)"
            )
        self.sealed = True

    def close(self) -> None:
        """Drop this process's mapping (the session unmaps `handle` from the workers first)."""
        super().close()
