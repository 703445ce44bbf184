"""The crypto worker pool: long-lived processes attached to shared memory, fed over socketpairs.

Workers are processes, not threads: with the daemon's event loop busy, a thread that re-acquires the
GIL after each `encrypt_into` waits up to the switch interval, which caps threads well below the cores
(measured in bench/engine.py). Jobs are batched per loop turn into one message per worker. A worker
that dies is restarted with the same maps and keys; the futures of its jobs fail with `WorkerLost`,
and the caller burns their IVs (they are never handed to another message).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from pipellm_client import crypto
from pipellm_client.errors import PipeLLMError, TagMismatch
from pipellm_client.keymem import LockedKey
from pipellm_client.shm import SharedMemory

from . import jobwire as w


class WorkerLost(PipeLLMError):
    """The worker running this job died; the job's output is undefined and its IV must be burned."""


class JobError(PipeLLMError):
    """A worker reported a job it could not run (bad handle or range): a daemon bug."""


@dataclass
class _Proc:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    outstanding: dict[int, tuple[asyncio.Future[None], int]] = field(default_factory=dict)
    load: int = 0
    outbox: deque[tuple[bytes, list[int]]] = field(default_factory=deque)
    pending_jobs: list[bytes] = field(default_factory=list)
    writer_armed: bool = False
    busy_ns: int = 0
    jobs: int = 0
    bytes: int = 0


class WorkerPool:
    """`count` worker processes, or `inline=True` to run jobs in the calling thread (tests, tiny hosts)."""

    def __init__(self, count: int, *, inline: bool = False) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self.inline = inline
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
        for s in (parent, child):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipellm_daemon.worker", str(child.fileno())],
            pass_fds=[child.fileno()],
            stdin=subprocess.DEVNULL,
        )
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
            self._detach(p)
            p.proc.terminate()
        for p in self._procs:
            try:
                await asyncio.wait_for(asyncio.to_thread(p.proc.wait), 5)
            except TimeoutError:
                p.proc.kill()
            self._fail_outstanding(p, "worker pool closed")
        self._procs.clear()
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
    ) -> asyncio.Future[None]:
        """Queue one job; the future resolves when its output is in place (TagMismatch for a bad OPEN)."""
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
        p = min(self._procs, key=lambda q: q.load)
        p.outstanding[job_id] = (fut, length)
        p.load += length + 4096
        p.pending_jobs.append(job.pack())
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
        aead = self._aeads[job.key_id]
        src, dst = self._maps[job.src_handle].view, self._maps[job.dst_handle].view
        t0 = time.perf_counter_ns()
        try:
            if job.kind == w.Kind.SEAL:
                aead.encrypt_into(
                    job.nonce,
                    src[job.src_offset : job.src_offset + job.length],
                    None,
                    dst[job.dst_offset : job.dst_offset + job.length + 16],
                )
            else:
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
        for p in self._procs:
            jobs = p.pending_jobs
            for i in range(0, len(jobs), w.MAX_JOBS_PER_MESSAGE):
                self._queue(p, b"".join(jobs[i : i + w.MAX_JOBS_PER_MESSAGE]), [])
            jobs.clear()

    def _queue(self, p: _Proc, msg: bytes, fds: list[int]) -> None:
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
            p.load -= length + 4096
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

    def _fail_outstanding(self, p: _Proc, why: str) -> None:
        for fut, _n in p.outstanding.values():
            if not fut.done():
                fut.set_exception(WorkerLost(why))
        p.outstanding.clear()
        p.load = 0

    def _worker_died(self, p: _Proc) -> None:
        self._detach(p)
        code = p.proc.poll()
        if self.closed:
            return
        lost = len(p.outstanding)
        self._fail_outstanding(p, f"crypto worker {p.index} (pid {p.proc.pid}) died with {code}")
        self.restarts += 1
        fresh = self._spawn(p.index)
        fresh.busy_ns, fresh.jobs, fresh.bytes = p.busy_ns, p.jobs, p.bytes
        self._procs[self._procs.index(p)] = fresh
        for cb in self.on_worker_lost:
            cb(p.index, lost)

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
            "queued_bytes": sum(max(0, p.load) for p in self._procs),
            "utilisation": [round(p.busy_ns / wall_ns, 4) for p in self._procs],
            "pids": self.pids(),
        }


def _fd_bytes(fds: list[int]) -> bytes:
    return b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds)


def default_worker_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
