"""A crypto worker pool on its own (no pipeline, no daemon) with a source and a destination region mapped,
for the tests that drive `WorkerPool` directly."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

from pipellm_client.shm import SharedMemory

from pipellm_daemon.workers import WorkerPool


@contextlib.asynccontextmanager
async def pool_with_memory(
    count: int = 1, *, src_bytes: int = 4 << 20, dst_bytes: int = 8 << 20, **pool_kw: Any
) -> AsyncIterator[tuple[WorkerPool, SharedMemory, SharedMemory, int, int]]:
    """(pool, src, dst, src handle, dst handle): a started pool of `count` workers (`pool_kw` for the rest of
    its settings), `src` full of random bytes, both regions mapped; all three are closed on the way out, even
    when the test fails (closing the pool early inside is fine: it closes once)."""
    pool = WorkerPool(count, **pool_kw)
    src, dst = SharedMemory.create("src", src_bytes), SharedMemory.create("dst", dst_bytes)
    try:
        await pool.start()
        src.view[:] = os.urandom(src_bytes)
        hs, hd = pool.new_handle(), pool.new_handle()
        pool.map(hs, src)
        pool.map(hd, dst)
        yield pool, src, dst, hs, hd
    finally:
        await pool.close()
        src.close()
        dst.close()
