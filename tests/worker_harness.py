"""A crypto worker pool on its own (no pipeline, no daemon) with a source and a destination region mapped,
for the tests that drive `WorkerPool` directly."""

from __future__ import annotations

import os
from typing import Any

from pipellm_client.shm import SharedMemory

from pipellm_daemon.workers import WorkerPool


async def pool_with_memory(
    count: int = 1, *, src_bytes: int = 4 << 20, dst_bytes: int = 8 << 20, **pool_kw: Any
) -> tuple[WorkerPool, SharedMemory, SharedMemory, int, int]:
    """(pool, src, dst, src handle, dst handle): a started pool of `count` workers (`pool_kw` for the rest of
    its settings), `src` full of random bytes, both regions mapped. The test closes all three."""
    pool = WorkerPool(count, **pool_kw)
    await pool.start()
    src, dst = SharedMemory.create("src", src_bytes), SharedMemory.create("dst", dst_bytes)
    src.view[:] = os.urandom(src_bytes)
    hs, hd = pool.new_handle(), pool.new_handle()
    pool.map(hs, src)
    pool.map(hd, dst)
    return pool, src, dst, hs, hd
