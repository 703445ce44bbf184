"""The crypto worker pool: real processes, zero-copy jobs, restarts that never reuse an IV."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client.errors import TagMismatch
from pipellm_client.shm import SharedMemory

from pipellm_daemon import jobwire as w
from pipellm_daemon.workers import JobError, WorkerLost

from .worker_harness import pool_with_memory


@pytest.mark.parametrize("inline", [False, True])
def test_seal_and_open_match_cryptography(inline: bool) -> None:
    async def run() -> None:
        async with pool_with_memory(2, inline=inline) as (pool, src, dst, hs, hd):
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

    asyncio.run(run())


def test_killed_worker_is_restarted_and_its_jobs_fail() -> None:
    async def run() -> None:
        async with pool_with_memory() as (pool, src, dst, hs, hd):
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

    asyncio.run(run())


# -- the shared-memory rings ---------------------------------------------------------------------------
def _expect(key: bytes, nonce: bytes, src: SharedMemory, off: int, n: int) -> bytes:
    return AESGCM(key).encrypt(nonce, bytes(src.view[off : off + n]), None)


@pytest.mark.parametrize("count", [1, 2])
def test_more_jobs_than_ring_slots_all_arrive_in_place(count: int) -> None:
    """A ring of 4 slots and a window of 64 small jobs: most records wait in the backlog, none is lost or
    run with another's nonce, urgent or not."""

    async def run() -> None:
        async with pool_with_memory(
            count, src_bytes=1 << 20, dst_bytes=300 * 4096, ring_slots=4, window_bytes=64 * (4096 + 4096)
        ) as (pool, src, dst, hs, hd):
            key = os.urandom(32)
            kid = pool.add_key(key)
            jobs = [(os.urandom(12), (i * 997) % 4000, 1 + (i * 31) % 4000) for i in range(300)]
            futs = [  # every seventh urgent: announced at once, the others possibly held back with their batch
                pool.submit(w.Kind.SEAL, kid, nonce, (hs, off), n, (hd, i * 4096), urgent=i % 7 == 0)
                for i, (nonce, off, n) in enumerate(jobs)
            ]
            await asyncio.gather(*futs)
            for i, (nonce, off, n) in enumerate(jobs):
                assert bytes(dst.view[i * 4096 : i * 4096 + n + 16]) == _expect(key, nonce, src, off, n), i
            st = pool.stats()
            assert st["jobs"] == 300 and st["queued_bytes"] == 0 and not pool._key_jobs

    asyncio.run(run())


def test_control_operations_take_effect_between_the_jobs_around_them() -> None:
    """Maps, keys, unmaps and key drops travel over the socket but apply at their place in the ring."""

    async def run() -> None:
        async with pool_with_memory() as (pool, src, dst, hs, hd):
            key = os.urandom(32)
            kid = pool.add_key(key)
            nonce = os.urandom(12)
            # A map and a job that writes into it, submitted in the same turn: the map comes first.
            late = SharedMemory.create("late", 1 << 20)
            hl = pool.new_handle()
            pool.map(hl, late)
            first = pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), 1000, (hl, 0))
            # A key installed and used at once, and dropped while its jobs are still queued or running.
            key2 = os.urandom(32)
            kid2 = pool.add_key(key2)
            batch = [pool.submit(w.Kind.SEAL, kid2, nonce, (hs, i), 1 << 20, (hd, 0)) for i in range(6)]
            pool.drop_key(kid2)
            assert kid2 in pool._keys, "a key is dropped only once no job needs it"
            # Jobs that use a handle, then its unmap: the jobs run first.
            tail = [pool.submit(w.Kind.SEAL, kid, nonce, (hs, 64), 512, (hl, 4096 + i * 1024)) for i in range(5)]
            pool.unmap(hl)
            await asyncio.gather(first, *batch, *tail)
            assert bytes(late.view[:1016]) == _expect(key, nonce, src, 0, 1000)
            assert bytes(late.view[4096 : 4096 + 528]) == _expect(key, nonce, src, 64, 512)
            assert bytes(dst.view[: (1 << 20) + 16]) == _expect(key2, nonce, src, 5, 1 << 20)
            assert kid2 not in pool._keys and not pool._key_jobs
            # The worker forgot the dropped key and the unmapped handle: such a job is a daemon bug, reported,
            # and the worker goes on with the next one.
            with pytest.raises(JobError):
                await pool.submit(w.Kind.SEAL, kid2, nonce, (hs, 0), 16, (hd, 0))
            with pytest.raises(JobError):
                await pool.submit(w.Kind.OPEN, kid, nonce, (hd, 0), 16, (hl, 0))
            await pool.submit(w.Kind.SEAL, kid, nonce, (hs, 0), 16, (hd, 0))
            assert bytes(dst.view[:32]) == _expect(key, nonce, src, 0, 16)
            assert pool.restarts == 0
            await pool.close()  # before `late` goes: the workers map it
            late.close()

    asyncio.run(run())


def test_a_tag_failure_fails_only_its_own_job() -> None:
    async def run() -> None:
        async with pool_with_memory() as (pool, src, dst, hs, hd):
            key, nonces = os.urandom(32), [os.urandom(12) for _ in range(8)]
            kid = pool.add_key(key)
            slot = 64 << 10
            await asyncio.gather(
                *(
                    pool.submit(w.Kind.SEAL, kid, nonces[i], (hs, i * slot), slot, (hd, i * (slot + 16)))
                    for i in range(8)
                )
            )
            dst.view[3 * (slot + 16) + 7] ^= 1
            opens = [
                pool.submit(w.Kind.OPEN, kid, nonces[i], (hd, i * (slot + 16)), slot, (hs, (2 << 20) + i * slot))
                for i in range(8)
            ]
            results = await asyncio.gather(*opens, return_exceptions=True)
            assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["TagMismatch"] + ["NoneType"] * 4
            for i in (0, 1, 2, 4, 5, 6, 7):
                assert bytes(src.view[(2 << 20) + i * slot : (2 << 20) + (i + 1) * slot]) == bytes(
                    src.view[i * slot : (i + 1) * slot]
                )
            assert bytes(src.view[(2 << 20) + 3 * slot : (2 << 20) + 4 * slot]) == bytes(slot)

    asyncio.run(run())


def test_a_dead_workers_ring_and_backlog_fail_and_the_queue_waits_for_its_replacement() -> None:
    async def run() -> None:
        async with pool_with_memory(
            ring_slots=4,
            window_bytes=8 << 20,
            dst_bytes=(1 << 20) + 16,
        ) as (pool, _src, _dst, hs, hd):
            key = os.urandom(32)
            kid = pool.add_key(key)
            await pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 16, (hd, 0))  # maps and key are in
            futs = [pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (hd, 0)) for _ in range(30)]
            p = pool._procs[0]  # a window of 8 handed out: 4 in the ring, 4 in the backlog; the rest queued
            assert len(p.inflight) == 4 and len(p.backlog) == 4
            os.kill(pool.pids()[0], signal.SIGKILL)
            results = await asyncio.gather(*futs, return_exceptions=True)
            lost = [r for r in results if isinstance(r, WorkerLost)]
            assert 4 <= len(lost) <= 8 and all(r is None for r in results if not isinstance(r, WorkerLost))
            assert results[-1] is None, "jobs still queued when it died ran on its replacement"
            assert pool.restarts == 1 and not pool._key_jobs and pool.stats()["queued_bytes"] == 0
            pool.drop_key(kid)
            assert kid not in pool._keys

    asyncio.run(run())


def test_a_cancelled_job_never_holds_its_key() -> None:
    async def run() -> None:
        async with pool_with_memory(
            window_bytes=2 << 20,
            src_bytes=1 << 20,
            dst_bytes=(1 << 20) + 16,
        ) as (pool, _src, _dst, hs, hd):
            kid = pool.add_key(os.urandom(32))
            futs = [pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (hd, 0)) for _ in range(10)]
            for f in futs[3:]:
                f.cancel()  # still queued (the window holds two): they never reach a worker
            pool.drop_key(kid)
            await asyncio.gather(*futs[:3])
            while kid in pool._keys:
                await asyncio.sleep(0.001)
            assert not pool._key_jobs and pool.stats()["jobs"] <= 3

    asyncio.run(run())


def test_a_worker_leaves_when_the_daemon_end_of_its_socket_closes() -> None:
    """The worker process on its own, driven through its ring by hand: one job, then the socket closes."""
    ring = w.Ring.create(8)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    passed = [child.fileno(), *ring.fds()]
    proc = subprocess.Popen([sys.executable, "-m", "pipellm_daemon.worker", *map(str, passed), "8"], pass_fds=passed)
    child.close()
    try:
        src, dst = SharedMemory.create("src", 4096), SharedMemory.create("dst", 4096)
        src.view[:] = os.urandom(4096)
        key, nonce = os.urandom(32), os.urandom(12)
        parent.sendmsg([w.MAP.pack(w.Op.MAP, 1, 4096, 0)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd(src.fd))])
        parent.sendmsg([w.MAP.pack(w.Op.MAP, 2, 4096, 1)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd(dst.fd))])
        parent.send(w.KEY.pack(w.Op.KEY, 9, key))
        for i in range(3):
            ring.mem[i * w.JOB_SLOT : i * w.JOB_SLOT + w.JOB.size] = w.CONTROL_RECORD
        w.JOB.pack_into(ring.mem, 3 * w.JOB_SLOT, w.Op.JOB, w.Kind.SEAL, 77, 9, nonce, 1, 0, 1000, 2, 8)
        os.eventfd_write(ring.job_efd, 4)
        done = 0
        while done < 4:
            select.select([ring.done_efd], [], [], 10)
            done += os.eventfd_read(ring.done_efd)
        assert w.DONE.unpack_from(ring.mem, ring.done_base + 3 * w.DONE_SLOT)[::2] == (77, w.Status.OK)
        assert bytes(dst.view[8 : 8 + 1016]) == AESGCM(key).encrypt(nonce, bytes(src.view[:1000]), None)
        parent.close()
        assert proc.wait(timeout=10) == 0
        src.close()
        dst.close()
    finally:
        if proc.poll() is None:
            proc.kill()
        ring.close()


def _fd(fd: int) -> bytes:
    return fd.to_bytes(4, sys.byteorder)
