"""A client's own memory used as a weapon: memfds resized, swapped for other files, sealed late, and
read-only regions written after their ciphertext was made.

Each test plays one allowed client against a real pipellmd while a bystander session on the same daemon
keeps moving bytes: the attack must be refused (or made impossible by the kernel), and neither the daemon
nor the bystander may notice. The kernel facts the defences rest on are checked directly as well.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from pipellm_client import Intent, shm
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.client import Session
from pipellm_client.errors import InvalidArgument

from pipellm_daemon import jobwire as w
from pipellm_daemon.workers import WorkerLost

from .daemon_harness import CH, SMALL_DAEMON, DaemonEnv, daemon_with_bystander, rand
from .worker_harness import pool_with_memory

pytestmark = [pytest.mark.integration]

SETTINGS: dict[str, Any] = {
    **SMALL_DAEMON,
    "h2d_slots": 16,
    "d2h_slots": 4,
    "demand_slots": 4,
    "small_transfer_threshold": 4096,  # every chunk is speculated (smaller transfers never are)
}
C = grpc.StatusCode
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def errno_of(fn: Any, *args: Any) -> int:
    """The errno a call fails with (0 if it succeeds): the kernel's answer is the assertion."""
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


Env = DaemonEnv


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with daemon_with_bystander(SETTINGS, background=True) as e:
        yield e


KILLED = [0]  # workers this module kills on purpose: every other restart is a finding


def check_unharmed(env: Env) -> None:
    d, c, b = env
    assert d.proc is not None and d.proc.poll() is None, f"pipellmd died:\n{d.log()[-3000:]}"
    b.wait_rounds(2)
    st = c.status()
    assert st.healthy and st.workers.restarts == KILLED[0], st


def offer(s: Session, fd: int, size: int, *, readonly: bool) -> tuple[C, str]:
    """Offer `fd` as a region of `size` bytes; the RegisterRegion status and its message."""
    offer_id = next(s.core.offers)
    s.fs.send(pb.Frame(offer=pb.Offer(offer_id=offer_id)), fds=[fd])
    req = pb.RegisterRegionRequest(session_id=s.id, offer_id=offer_id, size=size, readonly=readonly)
    try:
        s.client._stub.RegisterRegion(req, metadata=s.metadata, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return C.OK, ""


def mutable_bytes(s: Session, n: int) -> int:
    return n + -(-n // s.core.granule) * 8  # data, then the generation table


# -- A: resizing shared memory under the daemon ---------------------------------------------------------
def test_unsealed_mutable_memfd_is_refused_and_sdk_regions_cannot_be_truncated(env: Env) -> None:
    _d, c, _b = env
    with c.open_session("truncator") as s:
        # The reproduced attack: an unsealed memfd, registered, truncated, committed. Refused up front now.
        fd = os.memfd_create("evil", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, mutable_bytes(s, 4 * CH))
            code, msg = offer(s, fd, 4 * CH, readonly=False)
            assert code == C.INVALID_ARGUMENT and "F_SEAL_SHRINK | F_SEAL_GROW" in msg, (code, msg)
            os.ftruncate(fd, 0)  # what the attacker does next; nothing in the daemon maps it
        finally:
            os.close(fd)
        # The SDK's own regions: both size seals from birth, and the seal set frozen by the daemon.
        kv = s.alloc_region(4 * CH)
        kv.write(0, rand(4 * CH, 1))
        assert errno_of(os.ftruncate, kv.shm.fd, 0) == errno.EPERM
        assert errno_of(os.ftruncate, kv.shm.fd, 8 * mutable_bytes(s, 4 * CH)) == errno.EPERM
        assert errno_of(os.posix_fallocate, kv.shm.fd, 0, 16 << 20) == errno.EPERM
        dst = np.zeros(4 * CH, np.uint8)
        s.h2d(kv, 0, 4 * CH, dst)  # the commit that used to SIGBUS the daemon on the generation table
        assert (dst == rand(4 * CH, 1)).all()
    check_unharmed(env)


def test_arena_cannot_be_truncated_or_write_sealed_by_its_client(env: Env) -> None:
    _d, c, _b = env
    with c.open_session("arena-truncator") as s:
        assert s.core.arena is not None
        fd = s.core.arena.fd
        seals = fcntl.fcntl(fd, shm.F_GET_SEALS)
        assert seals & (shm.F_SEAL_SHRINK | shm.F_SEAL_GROW) == shm.F_SEAL_SHRINK | shm.F_SEAL_GROW, seals
        assert errno_of(os.ftruncate, fd, 0) == errno.EPERM
        assert errno_of(os.ftruncate, fd, s.core.arena.size * 2) == errno.EPERM
        # A FUTURE_WRITE seal would make every restarted worker's writable mapping of it fail: frozen.
        assert errno_of(fcntl.fcntl, fd, shm.F_ADD_SEALS, shm.F_SEAL_FUTURE_WRITE) == errno.EPERM
        data = rand(8 * CH, 2)
        w_ = s.alloc_region(len(data), readonly=True, data=data)
        dst = np.zeros(len(data), np.uint8)
        s.h2d(w_, 0, len(data), dst)
        assert (dst == data).all()
    check_unharmed(env)


def _non_memfds(tmp: str, size: int) -> Iterator[tuple[str, int, str]]:
    """(what, fd, words the refusal must contain): every fd here is the right size where it has one."""
    r, wr = os.pipe()
    os.close(wr)
    yield "pipe", r, "is a pipe, not a memfd"
    a, b = socket.socketpair()
    b.close()
    yield "socket", a.detach(), "is a socket, not a memfd"
    yield "/dev/zero", os.open("/dev/zero", os.O_RDWR), "character device"
    path = os.path.join(tmp, "region.bin")
    with open(path, "wb") as f:
        f.truncate(size)
    yield "regular file", os.open(path, os.O_RDWR), "not a memfd"  # (on a tmpfs /tmp: "shared-memory file")
    if os.path.isdir("/dev/shm"):
        p = f"/dev/shm/pipellm-test-{os.getpid()}"
        fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
        os.unlink(p)
        os.ftruncate(fd, size)
        yield "tmpfs file", fd, "not a memfd"
    fd = os.memfd_create("no-sealing", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    yield "memfd without MFD_ALLOW_SEALING", fd, "lacks F_SEAL_SHRINK | F_SEAL_GROW"
    fd = os.memfd_create("grow-only", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, shm.F_ADD_SEALS, shm.F_SEAL_SHRINK)
    yield "memfd that may still grow", fd, "lacks F_SEAL_GROW"
    fd = os.memfd_create("write-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, shm.F_ADD_SEALS, shm.F_SEAL_SHRINK | shm.F_SEAL_GROW | shm.F_SEAL_FUTURE_WRITE)
    yield "write-sealed memfd as a mutable region", fd, "sealed against writes"


def test_non_memfd_and_unsealed_fds_are_refused_precisely(env: Env) -> None:
    _d, c, _b = env
    with c.open_session("fd-swapper") as s, tempfile.TemporaryDirectory() as tmp:
        n = 4 * CH
        for what, fd, words in _non_memfds(tmp, mutable_bytes(s, n)):
            try:
                code, msg = offer(s, fd, n, readonly=False)
            finally:
                os.close(fd)
            assert code == C.INVALID_ARGUMENT and words in msg, (what, code, msg)
        # A read-only region offered through an O_RDONLY fd is fine (it is mapped read-only anyway) ...
        mem = shm.SharedMemory.create("ro-offer", n)
        ro = os.open(f"/proc/self/fd/{mem.fd}", os.O_RDONLY)
        try:
            assert offer(s, ro, n, readonly=True)[0] == C.OK
            # ... but a mutable one cannot be: the daemon could neither write it nor freeze its seals.
            code, msg = offer(s, os.dup(ro), n, readonly=False)
            assert code == C.INVALID_ARGUMENT, (code, msg)
        finally:
            os.close(ro)
            mem.close()
        dst = np.zeros(CH, np.uint8)
        kv = s.alloc_region(CH)
        s.h2d(kv, 0, CH, dst)
    check_unharmed(env)


def test_late_seals_cannot_stop_restarted_workers(env: Env) -> None:
    """A FUTURE_WRITE seal added after registration would make a restarted worker's MAP fail (a crash
    loop for every tenant); the daemon froze the seals, and for read-only regions no seal stops a read."""
    d, c, _b = env
    with c.open_session("late-sealer") as s:
        kv = s.alloc_region(4 * CH)
        assert errno_of(fcntl.fcntl, kv.shm.fd, shm.F_ADD_SEALS, shm.F_SEAL_FUTURE_WRITE) == errno.EPERM
        ro = s.alloc_region(4 * CH, readonly=True)
        ro.array[:] = 3
        fcntl.fcntl(ro.shm.fd, shm.F_ADD_SEALS, shm.F_SEAL_FUTURE_WRITE)  # allowed: it only blocks new writers
        req = pb.SealRegionRequest(session_id=s.id, region_id=ro.id)
        with pytest.raises(grpc.RpcError) as info:  # FUTURE_WRITE is not a seal the daemon trusts
            s.client._stub.SealRegion(req, metadata=s.metadata, timeout=20)
        assert info.value.code() == C.FAILED_PRECONDITION and "F_SEAL_WRITE" in (info.value.details() or "")
        ro.seal()  # the SDK's seal still works on top of it
        # A worker restart re-maps everything: nothing fails to map, nothing crash-loops.
        victim = next(p for p in psutil.Process(d.pid).children() if "pipellm_daemon.worker" in " ".join(p.cmdline()))
        victim.send_signal(signal.SIGKILL)
        KILLED[0] += 1
        deadline = time.monotonic() + 30
        while c.status().workers.restarts < KILLED[0] or len(psutil.Process(d.pid).children()) < 2:
            assert time.monotonic() < deadline, "the killed worker was not restarted"
            time.sleep(0.02)
        s.d2h(rand(4 * CH, 3), kv, 0, wait=True)
        dst = np.zeros(4 * CH, np.uint8)
        s.h2d(kv, 0, 4 * CH, dst)
        assert (dst == rand(4 * CH, 3)).all()
        s.h2d(ro, 0, 4 * CH, dst)
        assert (dst == 3).all()
        time.sleep(0.3)  # a crash loop would show as more restarts by now
    check_unharmed(env)


# -- B: read-only regions ------------------------------------------------------------------------------
def test_intents_declared_before_seal_never_deliver_stale_bytes(env: Env) -> None:
    _d, c, _b = env
    with c.open_session("early-intents") as s:
        n = 8 * CH
        r = s.alloc_region(n, readonly=True)  # all zeros, not sealed
        assert s.declare([Intent(r, i * CH, CH) for i in range(8)]) == 8
        time.sleep(0.3)  # time enough to encrypt all eight chunks ahead, if it were allowed
        ahead_before_seal = s.status().counters.bytes_ahead
        r.array[:] = 7
        r.seal()
        dst = np.zeros(n, np.uint8)
        s.h2d(r, 0, n, dst)
        assert (dst == 7).all(), f"stale ciphertext delivered: {np.unique(dst)}"
        assert ahead_before_seal == 0  # nothing was even encrypted from the unsealed bytes
        assert s.status().counters.channel_deaths == 0
    check_unharmed(env)


def _reopen(fd: int, flags: int) -> int:
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def test_sealed_readonly_memory_has_no_writer_left() -> None:
    """The kernel facts behind "sealed means immutable", on the SDK's own sealing path."""
    n = 3 * mmap.PAGESIZE + 100
    mem = shm.SharedMemory.create("ro", n)
    arr = np.frombuffer(mem.buf, np.uint8, count=n)
    arr[:] = 9
    addr = shm.address_of(mem.buf)
    mem.seal_readonly()
    seals, want = fcntl.fcntl(mem.fd, shm.F_GET_SEALS), shm.F_SEAL_WRITE | shm.F_SEAL_SHRINK | shm.F_SEAL_GROW
    assert seals & want == want, seals
    assert fcntl.fcntl(mem.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    rw = _reopen(mem.fd, os.O_RDWR)  # opening for writing is allowed; writing is not
    try:
        assert errno_of(os.pwrite, rw, b"x", 0) == errno.EPERM
        assert errno_of(mmap.mmap, rw, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) == errno.EPERM
        assert errno_of(os.ftruncate, rw, 0) == errno.EPERM
        # A read-only mapping of the O_RDWR file cannot be turned writable either (no VM_MAYWRITE).
        other = _libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, rw, 0)
        assert other not in (None, ctypes.c_void_p(-1).value)
        try:
            assert _libc.mprotect(other, shm.round_up(n), mmap.PROT_READ | mmap.PROT_WRITE) != 0
            assert ctypes.get_errno() == errno.EACCES
        finally:
            _libc.munmap(other, n)
    finally:
        os.close(rw)
    # The old mapping, still viewed by `arr`, is read-only now and cannot be made writable again.
    assert _libc.mprotect(addr, shm.round_up(n), mmap.PROT_READ | mmap.PROT_WRITE) != 0
    assert ctypes.get_errno() == errno.EACCES
    assert (arr == 9).all() and bytes(mem.view[:4]) == b"\x09" * 4 and mem.view.readonly
    mem.close()


def test_hugetlb_memfds_are_refused() -> None:
    """A hole punched in one is refilled from the huge page pool at the next fault: SIGBUS when empty."""
    try:
        fd = os.memfd_create("huge", os.MFD_CLOEXEC | os.MFD_HUGETLB | os.MFD_ALLOW_SEALING)
    except OSError:
        pytest.skip("no hugetlbfs on this kernel")
    try:
        with pytest.raises(InvalidArgument, match="hugetlb"):
            shm.check_memfd(fd)
    finally:
        os.close(fd)


def test_write_through_an_old_view_after_seal_faults() -> None:
    script = textwrap.dedent(
        """
        import numpy as np
        from pipellm_client.shm import SharedMemory
        shm = SharedMemory.create("ro", 1 << 16)
        arr = np.frombuffer(shm.buf, np.uint8)  # writable: made before the seal
        arr[:] = 1
        shm.seal_readonly()
        print("sealed", flush=True)
        arr[5] = 2
        print("wrote", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["sealed"], (proc.stdout, proc.stderr)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr)


def test_seal_refused_while_another_writable_mapping_exists() -> None:
    mem = shm.SharedMemory.create("busy", 1 << 16)
    extra = mmap.mmap(mem.fd, 1 << 16, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        with pytest.raises(InvalidArgument, match="another writable mapping"):
            mem.seal_readonly()
        assert mem.writable and not fcntl.fcntl(mem.fd, shm.F_GET_SEALS) & shm.F_SEAL_WRITE
        mem.buf[0] = 5  # and it is still usable: the writable mapping was put back
        assert extra[0] == 5
    finally:
        extra.close()
    mem.seal_readonly()  # with the other writer gone it works
    assert mem.seals() & shm.F_SEAL_WRITE
    mem.close()


# -- worker restarts and fairness (the pool on its own, small settings) --------------------------------
def test_a_crash_looping_worker_is_restarted_with_growing_delays() -> None:
    async def run() -> None:
        async with pool_with_memory(
            restart_backoff_s=0.05,
            restart_backoff_max_s=0.4,
            stable_after_s=30.0,
        ) as (pool, _src, _dst, hs, hd):
            kid = pool.add_key(os.urandom(32))
            gaps: list[float] = []
            for _ in range(6):
                pid = pool.pids()[0]
                os.kill(pid, signal.SIGKILL)
                t0 = time.monotonic()
                while pool.pids()[0] == pid or pool.alive() < 1:
                    await asyncio.sleep(0.002)
                gaps.append(time.monotonic() - t0)
            assert list(pool.restart_delays) == [0.0, 0.05, 0.1, 0.2, 0.4, 0.4]
            for gap, delay in zip(gaps, pool.restart_delays, strict=True):
                assert gap >= delay * 0.9, (gaps, list(pool.restart_delays))
            assert gaps[4] > gaps[1] and pool.restarts == 6
            # Jobs submitted while it is down wait for the replacement instead of failing.
            pid = pool.pids()[0]
            os.kill(pid, signal.SIGKILL)
            while pool.restarts < 7:  # the death is noticed (and the 0.4 s restart scheduled)
                await asyncio.sleep(0.002)
            await pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 4096, (hd, 0))
            assert pool.restart_delays[-1] == 0.4 and pool.pids()[0] != pid
            # A worker that stayed up past `stable_after_s` is restarted at once again.
            pool.stable_after_s = 0.05
            await asyncio.sleep(0.1)
            os.kill(pool.pids()[0], signal.SIGKILL)
            while pool.restarts < 8:
                await asyncio.sleep(0.002)
            assert pool.restart_delays[-1] == 0.0

    asyncio.run(run())


def test_one_tenants_backlog_does_not_starve_another() -> None:
    async def run() -> None:
        async with pool_with_memory(window_bytes=2 << 20) as (pool, _src, _dst, hs, hd):
            other = shm.SharedMemory.create("other-arena", 2 << 20)
            ho = pool.new_handle()
            pool.map(ho, other)
            kid = pool.add_key(os.urandom(32))
            order: list[str] = []
            # Tenant "hd" (its arena) queues 40 chunks; tenant "ho" then asks for one.
            hog = [pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (hd, 0)) for _ in range(40)]
            for f in hog:
                f.add_done_callback(lambda _f: order.append("hog"))
            await asyncio.sleep(0)
            small = pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (ho, 0))
            small.add_done_callback(lambda _f: order.append("other"))
            await asyncio.gather(small, *hog)
            ahead = order.index("other")
            assert ahead <= 6, f"the other tenant waited behind {ahead} of the backlog's 40 jobs"
            assert pool.stats()["queued_bytes"] == 0
            # Unmapping a handle with jobs still queued sends them first: none fails for want of a map.
            many = [pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (ho, 0)) for _ in range(12)]
            pool.unmap(ho)
            assert all(r is None for r in await asyncio.gather(*many, return_exceptions=True))
            late = [pool.submit(w.Kind.SEAL, kid, os.urandom(12), (hs, 0), 1 << 20, (hd, 0)) for _ in range(12)]
            await pool.close()
            assert all(isinstance(r, WorkerLost) for r in await asyncio.gather(*late, return_exceptions=True))
            other.close()

    asyncio.run(run())
