"""Host regions as the serving process sees them: shared memory the daemon maps too.

Every region's memfd is sealed against resizing from birth (`SharedMemory.create`), or the daemon refuses it.
Read-only regions (weights, adapters) are filled, then sealed: this process's mapping is swapped in place
for a read-only one and the memfd gets F_SEAL_WRITE, so no process can change the bytes any more and a
stray write faults instead of leaving stale ciphertext behind. The daemon encrypts nothing ahead from a
read-only region before it is sealed.
Mutable regions (KV cache) are changed through `write` / `writing`, which bump the write generations the
daemon checks before it uses ciphertext it made ahead of time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidArgument
from .shm import SharedMemory
from .wire import generation_table_bytes

if TYPE_CHECKING:
    import torch

Generations = np.ndarray[Any, np.dtype[np.uint64]]


def generation_table(shm: SharedMemory, size: int, granule: int) -> Generations:
    """A mutable region's write generations: the uint64 table after its `size` bytes of data, shared with
    the daemon (and digested into the delivery ring's records, so both ends must read it the same way)."""
    return np.frombuffer(shm.buf, dtype=np.uint64, count=generation_table_bytes(size, granule) // 8, offset=size)


def generations_snapshot(gens: Generations, granule: int, offset: int, length: int) -> bytes | None:
    """The generations covering a range, or None while a writer is inside it (one of them odd)."""
    g = gens[offset // granule : (offset + length - 1) // granule + 1]
    if (g & 1).any():
        return None
    return g.tobytes()


class RegionBase:
    """What both ends know of a region (the SDK's `Region` and the daemon's): its id, name and memory, its
    size and kind, its write generations (mutable regions) and their granule, and which ranges are inside it."""

    def __init__(self, region_id: int, name: str, shm: SharedMemory, size: int, readonly: bool, granule: int) -> None:
        self.id = region_id
        self.name = name
        self.shm = shm
        self.size = size
        self.readonly = readonly
        self.sealed = False
        self.granule = granule
        self.gens: Generations | None = None if readonly else generation_table(shm, size, granule)

    def granules(self, offset: int, length: int) -> range:
        """The granules (indices into the generation table) a range of bytes falls in."""
        return range(offset // self.granule, (offset + length - 1) // self.granule + 1)

    def generations(self, offset: int, length: int) -> bytes | None:
        """The write generations covering a range, as both ends compare them (b"" for a sealed read-only
        region), or None while that range may change: a writer inside it (a generation odd), or a read-only
        region not sealed yet. None means "do not encrypt ahead from these bytes"."""
        if self.gens is None:
            return b"" if self.sealed else None
        return generations_snapshot(self.gens, self.granule, offset, length)

    def close(self) -> None:
        """Drop this process's mapping."""
        self.gens = None
        self.shm.close()

    def check_range(self, offset: int, length: int) -> None:
        if length <= 0:
            raise InvalidArgument(f"length must be > 0, got {length}")
        if offset < 0 or offset > self.size or length > self.size - offset:
            raise InvalidArgument(
                f"range [{offset}, {offset + length}) is outside region {self.id} of {self.size} bytes"
            )


class Region(RegionBase):
    def __init__(
        self,
        region_id: int,
        name: str,
        shm: SharedMemory,
        size: int,
        readonly: bool,
        granule: int,
        wait_landed: Callable[[Region, int, int], None],
        seal_remote: Callable[[Region], None],
    ) -> None:
        super().__init__(region_id, name, shm, size, readonly, granule)
        self.adapter = False  # a LoRA adapter: the daemon's LoRA predictor ranks whole-region loads
        self._wait_landed = wait_landed
        self._seal_remote = seal_remote
        self.array: np.ndarray[Any, np.dtype[np.uint8]] = np.frombuffer(shm.buf, dtype=np.uint8, count=size)

    def __repr__(self) -> str:
        kind = "sealed" if self.sealed else ("read-only" if self.readonly else "mutable")
        return f"<Region {self.id} {self.name!r} {self.size} bytes {kind}>"

    def tensor(self) -> torch.Tensor:
        """A torch uint8 view of the region (no copy)."""
        import torch

        return torch.from_numpy(self.array)

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writing(self, offset: int, length: int) -> Iterator[np.ndarray[Any, np.dtype[np.uint8]]]:
        """Mutate [offset, offset+length) in place; ciphertext made from the old bytes becomes stale."""
        self.check_range(offset, length)
        if self.sealed:
            raise InvalidArgument(f"region {self.id} is sealed read-only")
        self._wait_landed(self, offset, length)
        span = self.granules(offset, length)
        g = None if self.gens is None else self.gens[span.start : span.stop]  # a view: += writes the table
        if g is not None:
            g += np.uint64(1)  # odd: a writer is inside
        try:
            yield self.array[offset : offset + length]
        finally:
            if g is not None:
                g += np.uint64(1)  # even again, and different from any snapshot taken before

    def write(self, offset: int, data: bytes | bytearray | memoryview | np.ndarray[Any, Any]) -> None:
        raw = (
            np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
            if not isinstance(data, np.ndarray)
            else data.view(np.uint8).reshape(-1)
        )
        with self.writing(offset, raw.size) as view:
            view[:] = raw

    def read(self, offset: int = 0, length: int | None = None) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """A view of the bytes, after any D2H data landing in that range is decrypted and verified."""
        length = self.size - offset if length is None else length
        self.check_range(offset, length)
        self._wait_landed(self, offset, length)
        return self.array[offset : offset + length]

    def prefault(self) -> None:
        """Mutable regions: allocate and map every page now. A page's first touch costs a fault (under 1 GB/s
        on some VMs); in a swap space it would land on the first swap-out into it. A serving engine that pins
        its CPU swap space at start-up pays that there; this is the same, for a region."""
        if self.readonly:
            raise InvalidArgument(f"region {self.id} is read-only: filling it at allocation has touched it")
        self.shm.prefault()

    def seal(self) -> None:
        """Read-only regions: freeze the contents once loaded. Every later write faults.

        Fails (InvalidArgument, region still writable) while something else holds a writable mapping or a
        pinned page of the region (cudaHostRegister, O_DIRECT, io_uring buffers): the kernel refuses the seal.
        """
        if self.freeze():
            self._seal_remote(self)
            self.sealed = True

    def freeze(self) -> bool:
        """The local half of `seal`: make the bytes read-only here (every later write faults). False when the
        region is sealed already; the caller then tells the daemon and marks the region `sealed`."""
        if not self.readonly:
            raise InvalidArgument(f"region {self.id} is mutable; only read-only regions are sealed")
        if self.sealed:
            return False
        self.shm.seal_readonly()
        self.array.flags.writeable = False
        return True
