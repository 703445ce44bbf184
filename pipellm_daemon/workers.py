"""The crypto worker pool: long-lived processes attached to shared memory, fed over socketpairs.

Workers are processes, not threads: with the daemon's event loop busy, a thread that re-acquires the
GIL after each `encrypt_into` waits up to the switch interval, which caps threads well below the cores
(measured in bench/engine.py). A worker that dies is restarted with the same maps and keys; the futures
of its jobs fail with `WorkerLost`, and the caller burns their IVs (they are never handed to another
message). A worker that keeps dying soon after its start is restarted with an exponential backoff, so a
crash loop (a poisoned input, a hostile peer) cannot make the daemon spin spawning processes.

Fairness: each worker holds at most `window_bytes` of jobs (sent in a few messages, so it never idles
waiting for the next); the rest wait in per-tenant queues (a tenant is a session: by default the arena
a job reads or writes) and are handed out in deficit round robin as workers finish. So a session that
queues a thousand chunks delays another session's next chunk by about one window, not by its backlog.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final

from pipellm_client import crypto
from pipellm_client.errors import PipeLLMError, TagMismatch
from pipellm_client.keymem import LockedKey
from pipellm_client.shm import SharedMemory

from . import jobwire as w


class WorkerLost(PipeLLMError):
    """The worker running this job died; the job's output is undefined and its IV must be burned."""


class JobError(PipeLLMError):
    """A worker reported a job it could not run (bad handle or range): a daemon bug."""


JOB_OVERHEAD: Final = 4096  # what a job costs beyond its bytes, in the window and fairness accounting


@dataclass(eq=False)
class _Proc:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    outstanding: dict[int, tuple[asyncio.Future[None], int]] = field(default_factory=dict)
    load: int = 0  # cost of the jobs given to this worker and not done yet
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)
    pending_jobs: list[bytes] = field(default_factory=list)  # given to it, not yet in a message
    pending_cost: int = 0
    writer_armed: bool = False
    busy_ns: int = 0
    jobs: int = 0
    bytes: int = 0
    spawned_at: float = field(default_factory=time.monotonic)
    up: bool = True  # False from its death until its replacement is spawned
    quick_deaths: int = 0  # consecutive deaths within `stable_after_s` of a spawn
    restart: asyncio.TimerHandle | None = None


# A job waiting for a worker: (job id, packed record, cost, future, src handle, dst handle).
_Queued = tuple[int, bytes, int, asyncio.Future[None], int, int]
_load = attrgetter("load")


class _Tenant:
    """One tenant's jobs not yet given to a worker, and its deficit-round-robin credit (in cost units)."""

    __slots__ = ("credit", "jobs", "key")

    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.jobs: deque[_Queued] = deque()
        self.credit = 0


class WorkerPool:
    """`count` worker processes, or `inline=True` to run jobs in the calling thread (tests, tiny hosts).

    `window_bytes`: jobs one worker holds at a time (the fairness granule). A worker that dies within
    `stable_after_s` of its start for the k-th time in a row is restarted after
    min(`restart_backoff_max_s`, `restart_backoff_s` * 2**(k-2)) seconds (the first time at once).
    """

    def __init__(
        self,
        count: int,
        *,
        inline: bool = False,
        window_bytes: int = 16 << 20,
        restart_backoff_s: float = 0.05,
        restart_backoff_max_s: float = 5.0,
        stable_after_s: float = 30.0,
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self.inline = inline
        self.window = max(1, window_bytes)
        self._message_cost = max(1, self.window // 4)  # several messages per window: no idle round trips
        self.quantum = (1 << 20) + JOB_OVERHEAD  # credit per round-robin turn: one default chunk's job
        self._tenants: dict[Hashable, _Tenant] = {}
        self._ring: deque[_Tenant] = deque()  # tenants with queued jobs; the head is being served
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.stable_after_s = stable_after_s
        self.restart_delays: deque[float] = deque(maxlen=64)  # the delay chosen at each death, newest last
        self._procs: list[_Proc] = []
        self._maps: dict[int, SharedMemory] = {}
        self._keys: dict[int, tuple[LockedKey, bytes]] = {}
        self._aeads: dict[int, Any] = {}
        self._next_job = 1
        self._next_handle = 1
        self._next_key = 1
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.restarts = 0
        self.started_at = time.monotonic()
        self.closed = False
        self.on_worker_lost: list[Any] = []
        self._inline_busy_ns = 0
        self._inline_jobs = 0
        self._key_jobs: dict[int, int] = {}  # key id -> jobs in flight that use it
        self._drop_when_idle: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started_at = time.monotonic()
        if not self.inline:
            for i in range(self.count):
                self._procs.append(self._spawn(i))

    def _spawn(self, index: int) -> _Proc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (parent, child):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipellm_daemon.worker", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        p = _Proc(index, proc, parent)
        assert self._loop is not None
        self._loop.add_reader(parent.fileno(), self._on_readable, p)
        for handle, shm in self._maps.items():
            self._queue(p, w.MAP.pack(w.Op.MAP, handle, shm.size, shm.writable), [shm.fd])
        for key_id, (key, _tag) in self._keys.items():
            self._queue(p, w.KEY.pack(w.Op.KEY, key_id, key.reveal()), [])
        return p

    async def close(self) -> None:
        self.closed = True
        for p in self._procs:
            if p.restart is not None:
                p.restart.cancel()
            p.up = False  # nothing is handed to it while we wait for the others to exit
            self._detach(p)
            p.proc.terminate()
        for p in self._procs:
            try:
                await asyncio.wait_for(asyncio.to_thread(p.proc.wait), 5)
            except TimeoutError:
                p.proc.kill()
            self._fail_outstanding(p, "worker pool closed")
        self._procs.clear()
        for t in self._ring:
            for queued in t.jobs:
                if not queued[3].done():
                    queued[3].set_exception(WorkerLost("worker pool closed"))
        self._ring.clear()
        self._tenants.clear()
        for key, _tag in self._keys.values():
            key.wipe()
        self._keys.clear()
        self._aeads.clear()

    def _detach(self, p: _Proc) -> None:
        if self._loop is not None and p.sock.fileno() >= 0:
            self._loop.remove_reader(p.sock.fileno())
            if p.writer_armed:
                self._loop.remove_writer(p.sock.fileno())
        p.sock.close()

    # -- shared state every worker holds -----------------------------------------------------------
    def new_handle(self) -> int:
        self._next_handle += 1
        return self._next_handle - 1

    def map(self, handle: int, shm: SharedMemory) -> None:
        self._maps[handle] = shm
        for p in self._procs:
            self._queue(p, w.MAP.pack(w.Op.MAP, handle, shm.size, shm.writable), [shm.fd])

    def unmap(self, handle: int) -> None:
        if self._maps.pop(handle, None) is not None:
            self._release_queued(handle)
            self._flush()  # jobs queued before the unmap must reach the workers before it
            for p in self._procs:
                self._queue(p, w.HANDLE.pack(w.Op.UNMAP, handle), [])

    def add_key(self, key: bytes) -> int:
        """Install a key in every worker; returns its id. Keys cross only the private socketpairs."""
        key_id = self._next_key
        self._next_key += 1
        self._keys[key_id] = (LockedKey(key), crypto.key_tag(key))
        if self.inline:
            self._aeads[key_id] = crypto.new_aead(key)
        for p in self._procs:
            self._queue(p, w.KEY.pack(w.Op.KEY, key_id, key), [])
        return key_id

    def drop_key(self, key_id: int) -> None:
        """Forget a key everywhere, once no job that uses it is still in flight."""
        if self._key_jobs.get(key_id):
            self._drop_when_idle.add(key_id)
            return
        entry = self._keys.pop(key_id, None)
        self._aeads.pop(key_id, None)
        if entry is not None:
            entry[0].wipe()
            for p in self._procs:
                self._queue(p, w.HANDLE.pack(w.Op.DROP_KEY, key_id), [])

    # -- jobs ------------------------------------------------------------------------------------
    def submit(
        self,
        kind: w.Kind,
        key_id: int,
        nonce: bytes,
        src: tuple[int, int],
        length: int,
        dst: tuple[int, int],
        tenant: Hashable | None = None,
    ) -> asyncio.Future[None]:
        """Queue one job; the future resolves when its output is in place (TagMismatch for a bad OPEN).

        `tenant` is whose job it is, for fair scheduling; by default the arena handle (the dst of a SEAL,
        the src of an OPEN), which is one per session.
        """
        assert self._loop is not None, "start() the pool first"
        if self.closed:
            raise WorkerLost("worker pool is closed")
        fut: asyncio.Future[None] = self._loop.create_future()
        if kind == w.Kind.SEAL:
            audit = crypto.auditor()
            if audit is not None:
                audit(self._keys[key_id][1], nonce, self._maps[src[0]].view[src[1] : src[1] + length])
        job_id = self._next_job
        self._next_job += 1
        job = w.Job(kind, job_id, key_id, nonce, src[0], src[1], length, dst[0], dst[1])
        self._key_jobs[key_id] = self._key_jobs.get(key_id, 0) + 1
        fut.add_done_callback(lambda _f: self._job_done(key_id))
        if self.inline:
            self._run_inline(job, fut)
            return fut
        key = tenant if tenant is not None else (dst[0] if kind == w.Kind.SEAL else src[0])
        t = self._tenants.get(key)
        if t is None:
            t = self._tenants[key] = _Tenant(key)
            if not self._ring:
                t.credit = self.quantum  # its turn starts now
            self._ring.append(t)
        t.jobs.append((job_id, job.pack(), length + JOB_OVERHEAD, fut, src[0], dst[0]))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return fut

    def _job_done(self, key_id: int) -> None:
        left = self._key_jobs[key_id] - 1
        if left:
            self._key_jobs[key_id] = left
            return
        del self._key_jobs[key_id]
        if key_id in self._drop_when_idle:
            self._drop_when_idle.discard(key_id)
            self.drop_key(key_id)

    def _run_inline(self, job: w.Job, fut: asyncio.Future[None]) -> None:
        aead: crypto.Aead = self._aeads[job.key_id]
        src, dst = self._maps[job.src_handle].view, self._maps[job.dst_handle].view
        t0 = time.perf_counter_ns()
        try:
            if job.kind == w.Kind.SEAL:  # unaudited here: submit() already audited this job
                aead.encrypt_into(
                    job.nonce,
                    src[job.src_offset : job.src_offset + job.length],
                    dst[job.dst_offset : job.dst_offset + job.length + 16],
                )
            else:  # race-proof: the arena slot is read once, through private memory
                crypto.open_into(
                    aead,
                    job.nonce,
                    src[job.src_offset : job.src_offset + job.length + 16],
                    dst[job.dst_offset : job.dst_offset + job.length],
                )
            fut.set_result(None)
        except TagMismatch as exc:
            fut.set_exception(exc)
        self._inline_busy_ns += time.perf_counter_ns() - t0
        self._inline_jobs += 1

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pump()

    def _pump(self) -> None:
        """Hand queued jobs to workers with room, then send what each worker was given."""
        if self._ring:
            self._hand_out()
        for p in self._procs:
            if p.pending_jobs:
                self._send_jobs(p)

    def _hand_out(self) -> None:
        """Deficit round robin over tenants, each job to the least-loaded live worker, until the windows
        are full: per job one `min` over the workers and a few deque operations."""
        live = [p for p in self._procs if p.up]
        if not live:
            return  # every worker waits for its restart; `_respawn` pumps again
        ring, window, quantum = self._ring, self.window, self.quantum
        while ring:
            p = min(live, key=_load)
            if p.load >= window:
                return
            t = ring[0]
            job_id, packed, cost, fut, _src, _dst = t.jobs[0]
            if t.credit < cost:
                ring.rotate(-1)  # its turn is over; the next tenant's begins
                ring[0].credit += quantum
                continue
            t.jobs.popleft()
            t.credit -= cost
            if not t.jobs:
                ring.popleft()
                del self._tenants[t.key]
                if ring:
                    ring[0].credit += quantum
            if not fut.done():  # a job cancelled before it reached a worker: nothing will write its output
                self._give(p, job_id, packed, cost, fut)

    def _give(self, p: _Proc, job_id: int, packed: bytes, cost: int, fut: asyncio.Future[None]) -> None:
        p.outstanding[job_id] = (fut, cost - JOB_OVERHEAD)
        p.load += cost
        p.pending_jobs.append(packed)
        p.pending_cost += cost
        if p.pending_cost >= self._message_cost or len(p.pending_jobs) >= w.MAX_JOBS_PER_MESSAGE:
            self._send_jobs(p)

    def _send_jobs(self, p: _Proc) -> None:
        jobs = p.pending_jobs
        p.pending_jobs = []
        p.pending_cost = 0
        self._queue(p, b"".join(jobs), [])

    def _release_queued(self, handle: int) -> None:
        """Before an UNMAP: queued jobs that use `handle` go to a worker now (ahead of their turn), since
        after the UNMAP no worker could run them; with no worker up they fail like a lost worker's."""
        live = [p for p in self._procs if p.up]
        for t in list(self._ring):
            if not any(q[4] == handle or q[5] == handle for q in t.jobs):
                continue
            keep: deque[_Queued] = deque()
            for q in t.jobs:
                if q[4] != handle and q[5] != handle:
                    keep.append(q)
                elif q[3].done():
                    continue
                elif live:
                    self._give(min(live, key=_load), q[0], q[1], q[2], q[3])
                else:
                    q[3].set_exception(WorkerLost("no crypto worker is running (restart pending)"))
            t.jobs = keep
            if not keep:
                self._ring.remove(t)
                del self._tenants[t.key]

    def _queue(self, p: _Proc, msg: bytes, fds: list[int]) -> None:
        if not p.up:
            return  # a dead worker: its replacement gets every map and key from `_spawn`
        p.outbox.append((msg, fds))
        self._drain(p)

    def _drain(self, p: _Proc) -> None:
        while p.outbox:
            msg, fds = p.outbox[0]
            try:
                if fds:
                    p.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))])
                else:
                    p.sock.send(msg)
            except BlockingIOError:
                if not p.writer_armed and self._loop is not None:
                    p.writer_armed = True
                    self._loop.add_writer(p.sock.fileno(), self._on_writable, p)
                return
            except OSError:
                return  # the reader sees the death and restarts the worker
            p.outbox.popleft()

    def _on_writable(self, p: _Proc) -> None:
        p.writer_armed = False
        assert self._loop is not None
        self._loop.remove_writer(p.sock.fileno())
        self._drain(p)

    def _on_readable(self, p: _Proc) -> None:
        try:
            data = p.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._worker_died(p)
            return
        for off in range(0, len(data), w.DONE.size):
            job_id, status, elapsed = w.DONE.unpack_from(data, off)
            fut, length = p.outstanding.pop(job_id, (None, 0))
            p.load -= length + JOB_OVERHEAD
            p.busy_ns += elapsed
            p.jobs += 1
            p.bytes += length
            if fut is None or fut.done():
                continue
            if status == w.Status.OK:
                fut.set_result(None)
            elif status == w.Status.TAG:
                fut.set_exception(TagMismatch("D2H authentication tag mismatch"))
            else:
                fut.set_exception(JobError(f"worker {p.index} could not run job {job_id}"))
        if self._ring:
            self._pump()  # room in this worker's window: the next tenant's jobs

    def _fail_outstanding(self, p: _Proc, why: str) -> None:
        for fut, _n in p.outstanding.values():
            if not fut.done():
                fut.set_exception(WorkerLost(why))
        p.outstanding.clear()
        p.pending_jobs = []
        p.pending_cost = 0
        p.load = 0

    def _worker_died(self, p: _Proc) -> None:
        self._detach(p)
        p.up = False
        code = p.proc.poll()
        if self.closed:
            return
        lost = len(p.outstanding)
        self._fail_outstanding(p, f"crypto worker {p.index} (pid {p.proc.pid}) died with {code}")
        p.outbox.clear()
        p.quick_deaths = p.quick_deaths + 1 if time.monotonic() - p.spawned_at < self.stable_after_s else 0
        delay = self._restart_delay(p.quick_deaths)
        self.restarts += 1
        self.restart_delays.append(delay)
        if delay <= 0:
            self._respawn(p)
        else:
            assert self._loop is not None
            p.restart = self._loop.call_later(delay, self._respawn, p)
        for cb in self.on_worker_lost:
            cb(p.index, lost)

    def _restart_delay(self, quick_deaths: int) -> float:
        """0 for a one-off death (and the first of a streak); then base, 2·base, 4·base, … up to the cap."""
        if quick_deaths <= 1:
            return 0.0
        return float(min(self.restart_backoff_max_s, self.restart_backoff_s * 2 ** min(quick_deaths - 2, 40)))

    def _respawn(self, dead: _Proc) -> None:
        dead.restart = None
        if self.closed or self._procs[dead.index] is not dead:
            return
        try:
            fresh = self._spawn(dead.index)
        except OSError:  # fork or exec failed (EAGAIN, ENOMEM): back off as for a crash, never spin
            dead.quick_deaths += 1
            delay = max(self.restart_backoff_s, self._restart_delay(dead.quick_deaths))
            assert self._loop is not None
            dead.restart = self._loop.call_later(delay, self._respawn, dead)
            return
        fresh.busy_ns, fresh.jobs, fresh.bytes = dead.busy_ns, dead.jobs, dead.bytes
        fresh.quick_deaths = dead.quick_deaths
        self._procs[dead.index] = fresh
        if self._ring:
            self._pump()

    # -- observation -----------------------------------------------------------------------------
    def pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs]

    def alive(self) -> int:
        """Worker processes running right now (a dead one counts until its replacement is up)."""
        return self.count if self.inline else sum(p.proc.poll() is None for p in self._procs)

    def stats(self) -> dict[str, Any]:
        wall_ns = max(1, int((time.monotonic() - self.started_at) * 1e9))
        if self.inline:
            return {
                "count": self.count,
                "kind": "inline",
                "restarts": 0,
                "jobs": self._inline_jobs,
                "utilisation": [round(self._inline_busy_ns / wall_ns, 4)],
                "pids": [],
            }
        return {
            "count": self.count,
            "kind": "process",
            "restarts": self.restarts,
            "jobs": sum(p.jobs for p in self._procs),
            "bytes": sum(p.bytes for p in self._procs),
            "queued_bytes": sum(max(0, p.load) for p in self._procs)
            + sum(q[2] - JOB_OVERHEAD for t in self._ring for q in t.jobs),
            "utilisation": [round(p.busy_ns / wall_ns, 4) for p in self._procs],
            "pids": self.pids(),
        }


def _fd_bytes(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


def default_worker_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
