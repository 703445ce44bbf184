"""The crypto worker pool: real processes, zero-copy jobs, restarts that never reuse an IV."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client.errors import TagMismatch
from pipellm_client.shm import SharedMemory

from pipellm_daemon import jobwire as w
from pipellm_daemon.workers import WorkerLost, WorkerPool


async def _pool_with_memory(count: int = 2, inline: bool = False):
    pool = WorkerPool(count, inline=inline)
    await pool.start()
    src = SharedMemory.create("src", 4 << 20)
    src.view[:] = os.urandom(4 << 20)
    dst = SharedMemory.create("dst", 8 << 20)
    hs, hd = pool.new_handle(), pool.new_handle()
    pool.map(hs, src)
    pool.map(hd, dst)
    return pool, src, dst, hs, hd


@pytest.mark.parametrize("inline", [False, True])
def test_seal_and_open_match_cryptography(inline: bool) -> None:
    async def run() -> None:
        pool, src, dst, hs, hd = await _pool_with_memory(inline=inline)
        key, nonce = os.urandom(32), os.urandom(12)
        kid = pool.add_key(key)
        sizes = [1, 15, 16, 4097, 1 << 20]
        futs = [
            pool.submit(w.Kind.SEAL, kid, nonce, (hs, i * 7), n, (hd, i * ((1 << 20) + 32)))
            for i, n in enumerate(sizes)
        ]
        await asyncio.gather(*futs)
        for i, n in enumerate(sizes):
            expect = AESGCM(key).encrypt(nonce, bytes(src.view[i * 7 : i * 7 + n]), None)
            assert bytes(dst.view[i * ((1 << 20) + 32) : i * ((1 << 20) + 32) + n + 16]) == expect
        # OPEN: decrypt slot 0 back into the source region, and a tampered one is refused and wiped.
        src.view[3 << 20 : (3 << 20) + 1] = b"\xaa"
        await pool.submit(w.Kind.OPEN, kid, nonce, (hd, 0), 1, (hs, 3 << 20))
        assert bytes(src.view[3 << 20 : (3 << 20) + 1]) == bytes(src.view[0:1])
        dst.view[(1 << 20) + 32] ^= 0xFF
        with pytest.raises(TagMismatch):
            await pool.submit(w.Kind.OPEN, kid, nonce, (hd, (1 << 20) + 32), 15, (hs, 2 << 20))
        assert bytes(src.view[2 << 20 : (2 << 20) + 15]) == bytes(15)
        await pool.close()

    asyncio.run(run())


def test_killed_worker_is_restarted_and_its_jobs_fail() -> None:
    async def run() -> None:
        pool, src, dst, hs, hd = await _pool_with_memory(count=1)
        lost: list[int] = []
        pool.on_worker_lost.append(lambda index, n: lost.append(n))
        key, nonce = os.urandom(32), os.urandom(12)
        kid = pool.add_key(key)
        await pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), 64, (hd, 0))
        pid = pool.pids()[0]
        futs = [pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), 1 << 20, (hd, 0)) for _ in range(50)]
        await asyncio.sleep(0)
        os.kill(pid, signal.SIGKILL)
        results = await asyncio.gather(*futs, return_exceptions=True)
        assert any(isinstance(r, WorkerLost) for r in results)
        assert pool.restarts == 1 and lost and pool.pids()[0] != pid
        # The new worker has the maps and keys back.
        await pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), 64, (hd, 4096))
        assert bytes(dst.view[4096 : 4096 + 80]) == AESGCM(key).encrypt(nonce, bytes(src.view[:64]), None)
        await pool.close()

    asyncio.run(run())
