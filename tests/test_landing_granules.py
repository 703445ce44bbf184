"""D2H landings into disjoint bytes of one generation granule, at once (the daemon's side of the seqlock).

Found by `make bench-quick` (vLLM V0, naive mode): two swap-outs into adjacent, unaligned ranges shared a
64 KiB granule; each landing added one to the granule's generation when it began and one when it ended, so
while both ran the granule read even, and after the first ended it read odd with no landing left on the
first range's bytes, and a swap-in of that range was refused ("being written right now"). A granule must
stay odd until its last writer ends, and a reader must wait for every landing on its granules.
"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
from pipellm_client.shm import SharedMemory
from pipellm_client.wire import generation_table_bytes

from pipellm_daemon.regions import Region

GRANULE = 64 << 10


def _region(size: int = 4 * GRANULE) -> Region:
    shm = SharedMemory.create("test-granules", size + generation_table_bytes(size, GRANULE))
    return Region(1, "kv", shm, size, False, GRANULE, handle=1)


def _land(loop: asyncio.AbstractEventLoop, r: Region, off: int, n: int) -> asyncio.Future[None]:
    fut: asyncio.Future[None] = loop.create_future()
    r.pending_writes.append((off, n, fut))
    r.begin_write(off, n)
    return fut


def _landed(r: Region, off: int, n: int, fut: asyncio.Future[None]) -> None:
    r.end_write(off, n)
    r.pending_writes = [p for p in r.pending_writes if p[2] is not fut]
    fut.set_result(None)


def test_a_granule_stays_odd_until_its_last_landing_ends_and_readers_wait_for_it() -> None:
    loop = asyncio.new_event_loop()
    try:
        r = _region()
        a, b = (0, GRANULE + GRANULE // 2), (GRANULE + GRANULE // 2, GRANULE)  # both write into granule 1
        before = r.generations(0, 3 * GRANULE)
        assert before is not None
        fa, fb = _land(loop, r, *a), _land(loop, r, *b)
        assert r.generations(*a) is None and r.generations(*b) is None  # two writers: still odd, not even
        _landed(r, *a, fa)
        # A has landed, but B still writes into granule 1: A's bytes cannot be validated yet ...
        assert r.generations(*a) is None
        assert r.overlapping_writes(*a) == []  # ... though no landing writes A's own bytes ...
        assert r.landings_touching(*a) == [fb]  # ... so a reader of A waits for B
        assert r.generations(0, GRANULE) is not None  # granule 0 had only A: done
        _landed(r, *b, fb)
        after = r.generations(0, 3 * GRANULE)
        assert after is not None and after != before  # a new generation on every granule written
        assert r.landings_touching(0, 4 * GRANULE) == []
        r.shm.close()
    finally:
        loop.close()


@pytest.mark.parametrize("seed", range(20))
def test_random_interleavings_keep_a_granule_odd_exactly_while_a_landing_covers_it(seed: int) -> None:
    rng = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        r = _region(8 * GRANULE)
        active: list[tuple[int, int, asyncio.Future[None]]] = []
        free_from = 0
        for _ in range(60):
            if active and (rng.random() < 0.5 or free_from >= 8 * GRANULE):
                off, n, fut = active.pop(rng.randrange(len(active)))
                _landed(r, off, n, fut)
            elif free_from < 8 * GRANULE:  # disjoint byte ranges, as the daemon allows at once
                n = min(rng.randrange(1, 2 * GRANULE), 8 * GRANULE - free_from)
                active.append((free_from, n, _land(loop, r, free_from, n)))
                free_from += n
            assert r.gens is not None
            for g in range(8):
                covered = any(off // GRANULE <= g <= (off + n - 1) // GRANULE for off, n, _f in active)
                assert bool(int(r.gens[g]) & 1) == covered
                readable = r.generations(g * GRANULE, GRANULE) is not None
                assert readable == (not r.landings_touching(g * GRANULE, GRANULE))
        for off, n, fut in active:
            _landed(r, off, n, fut)
        assert r.gens is not None and not (np.asarray(r.gens) & 1).any()
        r.shm.close()
    finally:
        loop.close()
