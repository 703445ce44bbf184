"""The crypto worker pool: long-lived processes attached to shared memory, fed through shared-memory rings.

Workers are processes, not threads: with the daemon's event loop busy, a thread that re-acquires the
GIL after each encryption waits up to the switch interval, which caps threads well below the cores
(measured in bench/engine.py). A worker that dies is restarted with the same maps and keys; the futures
of its jobs fail with `WorkerLost`, and the caller burns their IVs (they are never handed to another
message). A worker that keeps dying soon after its start is restarted with an exponential backoff, so a
crash loop (a poisoned input, a hostile peer) cannot make the daemon spin spawning processes.

Transport (`jobwire`): each worker has a private memfd with a job ring and a completion ring, and an
eventfd per direction that carries how many records are new; maps and keys still cross its socketpair,
each marked in the job ring by a CONTROL record where it takes effect. A job submitted while nobody waits
goes straight into the least-loaded worker's ring (the doorbell, one eventfd write, rings at once if the
worker may run dry, else once per event-loop turn); a worker runs its ring without waiting for the
daemon and announces completions a few at a time while more jobs are queued (`worker.HOLD_NS`), so the
daemon wakes once per few jobs, not once per job. The worker's socket is only read for EOF: its death.

Fairness: each worker holds at most `window_bytes` of jobs (several, so it never idles waiting for the
next); the rest wait in per-tenant queues (a tenant is a session: by default the arena a job reads or
writes) and are handed out in deficit round robin as workers finish. So a session that queues a thousand
chunks delays another session's next chunk by about one window, not by its backlog.
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
from pipellm_client.wire import send_packet

from . import jobwire as w
from .config import default_worker_count  # noqa: F401 (bench/ imports it from here)


class WorkerLost(PipeLLMError):
    """The worker running this job died; the job's output is undefined and its IV must be burned."""


class JobError(PipeLLMError):
    """A worker reported a job it could not run (bad handle or range): a daemon bug."""


JOB_OVERHEAD: Final = 4096  # what a job costs beyond its bytes, in the window and fairness accounting


# A job as the pool holds it: its ring record's fields (op, kind, job id, key id, nonce, src handle, src offset,
# length, dst handle, dst offset), its cost and its future.
_Fields = tuple[int, int, int, int, bytes, int, int, int, int, int]
_Queued = tuple[_Fields, int, asyncio.Future[None]]
# What the pool remembers of each record in a worker's ring, in ring order (None: a CONTROL record).
_InFlight = tuple[int, asyncio.Future[None], int, int] | None  # job id, future, length, key id


@dataclass(eq=False)
class _Proc:
    index: int
    proc: subprocess.Popen[bytes]
    sock: socket.socket
    ring: w.Ring
    inflight: deque[_InFlight] = field(default_factory=deque)  # records in the ring, oldest first
    backlog: deque[tuple[_Fields | None, _InFlight]] = field(default_factory=deque)  # waiting for ring room
    load: int = 0  # cost of the jobs given to this worker and not done yet
    head: int = 0  # records written into the ring
    signalled: int = 0  # records announced on its job eventfd
    done: int = 0  # completions read
    unsent: deque[tuple[bytes, list[int]]] = field(default_factory=deque)  # control messages not yet sent
    writer_armed: bool = False
    busy_ns: int = 0
    jobs: int = 0
    bytes: int = 0
    spawned_at: float = field(default_factory=time.monotonic)
    up: bool = True  # False from its death until its replacement is spawned
    quick_deaths: int = 0  # consecutive deaths within `stable_after_s` of a spawn
    restart: asyncio.TimerHandle | None = None


_load = attrgetter("load")
_pack_job = w.JOB.pack_into
_unpack_done = w.DONE.unpack_from
# Plain ints for the per-job paths (an IntEnum member costs a class lookup at each use).
_OK: Final = int(w.Status.OK)
_TAG: Final = int(w.Status.TAG)
_SEAL: Final = int(w.Kind.SEAL)
_JOB: Final = int(w.Op.JOB)
_URGENT: Final = w.URGENT
_KIND_MASK: Final = w.KIND_MASK
_JOB_SLOT: Final = w.JOB_SLOT
_DONE_SLOT: Final = w.DONE_SLOT
_EAGER_DOORBELL: Final = 4  # a worker with fewer announced jobs than this is woken at once by a submit


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
        ring_slots: int = w.RING_SLOTS,
    ) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self.inline = inline
        self.window = max(1, window_bytes)
        self.ring_slots = max(2, ring_slots)
        self.quantum = (1 << 20) + JOB_OVERHEAD  # credit per round-robin turn: one default chunk's job
        self._tenants: dict[Hashable, _Tenant] = {}
        self._ring: deque[_Tenant] = deque()  # tenants with queued jobs; the head is being served
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.stable_after_s = stable_after_s
        self.restart_delays: deque[float] = deque(maxlen=64)  # the delay chosen at each death, newest last
        self._procs: list[_Proc] = []
        self._live: list[_Proc] = []  # the workers that are up, in index order
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
        self._key_jobs: dict[int, int] = {}  # key id -> jobs submitted and not finished that use it
        self._drop_when_idle: set[int] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started_at = time.monotonic()
        if not self.inline:
            for i in range(self.count):
                self._procs.append(self._spawn(i))
            self._live = list(self._procs)

    def _spawn(self, index: int) -> _Proc:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ring: w.Ring | None = None
        try:
            ring = w.Ring.create(self.ring_slots)
            parent.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            passed = [child.fileno(), *ring.fds()]
            proc = subprocess.Popen(
                [sys.executable, "-m", "pipellm_daemon.worker", *map(str, passed), str(ring.slots)],
                pass_fds=passed,
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            if ring is not None:
                ring.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        p = _Proc(index, proc, parent, ring)
        assert self._loop is not None
        self._loop.add_reader(parent.fileno(), self._on_socket, p)
        self._loop.add_reader(ring.done_efd, self._on_done, p)
        for handle, shm in self._maps.items():
            self._control(p, w.MAP.pack(w.Op.MAP, handle, shm.size, shm.writable), [shm.fd])
        for key_id, (key, _tag) in self._keys.items():
            self._control(p, w.KEY.pack(w.Op.KEY, key_id, key.reveal()), [])
        return p

    async def close(self) -> None:
        self.closed = True
        self._live = []
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
            p.ring.close()
        self._procs.clear()
        for t in self._ring:
            for fields, _cost, fut in t.jobs:
                self._job_done(fields[3])
                if not fut.done():
                    fut.set_exception(WorkerLost("worker pool closed"))
        self._ring.clear()
        self._tenants.clear()
        for key, _tag in self._keys.values():
            key.wipe()
        self._keys.clear()
        self._aeads.clear()

    def _detach(self, p: _Proc) -> None:
        if p.sock.fileno() < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(p.sock.fileno())
            self._loop.remove_reader(p.ring.done_efd)
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
            self._control(p, w.MAP.pack(w.Op.MAP, handle, shm.size, shm.writable), [shm.fd])

    def unmap(self, handle: int) -> None:
        if self._maps.pop(handle, None) is not None:
            self._release_queued(handle)
            self._flush()  # jobs queued before the unmap reach the rings before it
            for p in self._procs:
                self._control(p, w.HANDLE.pack(w.Op.UNMAP, handle), [])

    def add_key(self, key: bytes) -> int:
        """Install a key in every worker; returns its id. Keys cross only the private socketpairs."""
        key_id = self._next_key
        self._next_key += 1
        self._keys[key_id] = (LockedKey(key), crypto.key_tag(key))
        if self.inline:
            self._aeads[key_id] = crypto.new_aead(key)
        for p in self._procs:
            self._control(p, w.KEY.pack(w.Op.KEY, key_id, key), [])
        return key_id

    def drop_key(self, key_id: int) -> None:
        """Forget a key everywhere, once no job that uses it is still queued or in a worker."""
        if self._key_jobs.get(key_id):
            self._drop_when_idle.add(key_id)
            return
        entry = self._keys.pop(key_id, None)
        self._aeads.pop(key_id, None)
        if entry is not None:
            entry[0].wipe()
            for p in self._procs:
                self._control(p, w.HANDLE.pack(w.Op.DROP_KEY, key_id), [])

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
        urgent: bool = False,
    ) -> asyncio.Future[None]:
        """Queue one job; the future resolves when its output is in place (TagMismatch for a bad OPEN).

        `tenant` is whose job it is, for fair scheduling; by default the arena handle (the dst of a SEAL,
        the src of an OPEN), which is one per session. A worker with more jobs queued behind this one
        may announce its completion together with theirs (up to `worker.HOLD_NS` later): one wake-up of
        the daemon for several jobs. `urgent=True` is for a job someone is waiting on right now (an
        on-demand chunk, a D2H landing): its completion is announced as soon as it is done.
        """
        loop = self._loop
        assert loop is not None, "start() the pool first"
        if self.closed:
            raise WorkerLost("worker pool is closed")
        fut: asyncio.Future[None] = loop.create_future()
        seal = kind == _SEAL
        if seal and not self.inline:
            # A worker process runs `crypto.seal_job` where no auditor is installed: this job is audited here,
            # as it leaves for the worker. (Inline jobs are audited once, by `crypto.seal_job` itself.)
            audit = crypto.auditor()
            if audit is not None:
                audit(self._keys[key_id][1], nonce, self._maps[src[0]].view[src[1] : src[1] + length])
        job_id = self._next_job
        self._next_job = job_id + 1
        wire_kind = int(kind) | _URGENT if urgent else int(kind)
        fields: _Fields = (_JOB, wire_kind, job_id, key_id, nonce, src[0], src[1], length, dst[0], dst[1])
        kj = self._key_jobs
        kj[key_id] = kj.get(key_id, 0) + 1
        if self.inline:
            self._run_inline(fields, fut)
            return fut
        cost = length + JOB_OVERHEAD
        live = self._live
        if not self._ring and live:  # nobody waits: straight into the least-loaded worker's ring
            p = live[0] if len(live) == 1 else min(live, key=_load)
            if p.load < self.window:
                self._give(p, fields, cost, fut)
                if p.signalled - p.done < _EAGER_DOORBELL:  # it may run dry: wake it now
                    self._doorbell(p)
                elif not self._flush_scheduled:  # busy: one doorbell for this turn's jobs
                    self._flush_scheduled = True
                    loop.call_soon(self._flush)
                return fut
        key = tenant if tenant is not None else (dst[0] if seal else src[0])
        t = self._tenants.get(key)
        if t is None:
            t = self._tenants[key] = _Tenant(key)
            if not self._ring:
                t.credit = self.quantum  # its turn starts now
            self._ring.append(t)
        t.jobs.append((fields, cost, fut))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return fut

    def _job_done(self, key_id: int) -> None:
        """A job that uses `key_id` is over (done, failed, or dropped before it reached a worker)."""
        left = self._key_jobs[key_id] - 1
        if left:
            self._key_jobs[key_id] = left
            return
        del self._key_jobs[key_id]
        if key_id in self._drop_when_idle:
            self._drop_when_idle.discard(key_id)
            self.drop_key(key_id)

    def _run_inline(self, fields: _Fields, fut: asyncio.Future[None]) -> None:
        _op, kind, _job_id, key_id, nonce, sh, so, n, dh, do = fields
        aead: crypto.Aead = self._aeads[key_id]
        src, dst = self._maps[sh].view, self._maps[dh].view
        t0 = time.perf_counter_ns()
        try:
            if kind & _KIND_MASK == _SEAL:  # the one door, which audits it (submit() did not)
                crypto.seal_job(aead, nonce, src[so : so + n], dst[do : do + n + 16])
            else:  # race-proof: the arena slot is read once, through private memory
                crypto.open_into(aead, nonce, src[so : so + n + 16], dst[do : do + n])
            fut.set_result(None)
        except TagMismatch as exc:
            fut.set_exception(exc)
        finally:
            self._job_done(key_id)
        self._inline_busy_ns += time.perf_counter_ns() - t0
        self._inline_jobs += 1

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._pump()

    def _pump(self) -> None:
        """Hand queued jobs to workers with room, then ring the doorbell of each worker given any."""
        if self._ring:
            self._hand_out()
        for p in self._procs:
            self._doorbell(p)

    def _hand_out(self) -> None:
        """Deficit round robin over tenants, each job to the least-loaded live worker, until the windows
        are full: per job one `min` over the workers and a few deque operations."""
        live = self._live
        if not live:
            return  # every worker waits for its restart; `_respawn` pumps again
        ring, window, quantum = self._ring, self.window, self.quantum
        while ring:
            p = min(live, key=_load) if len(live) > 1 else live[0]
            if p.load >= window:
                return
            t = ring[0]
            fields, cost, fut = t.jobs[0]
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
            if fut.done():  # a job cancelled before it reached a worker: nothing will write its output
                self._job_done(fields[3])
            else:
                self._give(p, fields, cost, fut)

    def _give(self, p: _Proc, fields: _Fields, cost: int, fut: asyncio.Future[None]) -> None:
        """Write a job into the worker's ring (or its backlog when the ring is full); the doorbell rings
        separately, once for everything written in a turn."""
        p.load += cost
        entry = (fields[2], fut, fields[7], fields[3])
        inflight = p.inflight
        if p.backlog or len(inflight) >= p.ring.slots:
            p.backlog.append((fields, entry))
            return
        _pack_job(p.ring.mem, (p.head % p.ring.slots) * _JOB_SLOT, *fields)
        p.head += 1
        inflight.append(entry)

    def _put(self, p: _Proc, fields: _Fields | None, entry: _InFlight) -> None:
        if p.backlog or len(p.inflight) >= p.ring.slots:
            p.backlog.append((fields, entry))
        else:
            self._write(p, fields, entry)

    def _write(self, p: _Proc, fields: _Fields | None, entry: _InFlight) -> None:
        ring = p.ring
        off = (p.head % ring.slots) * _JOB_SLOT
        if fields is None:
            ring.mem[off : off + w.JOB.size] = w.CONTROL_RECORD
        else:
            _pack_job(ring.mem, off, *fields)
        p.head += 1
        p.inflight.append(entry)

    def _doorbell(self, p: _Proc) -> None:
        if p.head == p.signalled:
            return
        try:
            os.eventfd_write(p.ring.job_efd, p.head - p.signalled)
        except OSError:
            return  # never: the counter cannot overflow in practice
        p.signalled = p.head

    def _release_queued(self, handle: int) -> None:
        """Before an UNMAP: queued jobs that use `handle` go to a worker now (ahead of their turn), since
        after the UNMAP no worker could run them; with no worker up they fail like a lost worker's."""
        live = self._live
        for t in list(self._ring):
            if not any(q[0][5] == handle or q[0][8] == handle for q in t.jobs):
                continue
            keep: deque[_Queued] = deque()
            for q in t.jobs:
                fields, cost, fut = q
                if fields[5] != handle and fields[8] != handle:
                    keep.append(q)
                    continue
                if fut.done():
                    self._job_done(fields[3])
                elif live:
                    self._give(min(live, key=_load), fields, cost, fut)
                else:
                    self._job_done(fields[3])
                    fut.set_exception(WorkerLost("no crypto worker is running (restart pending)"))
            t.jobs = keep
            if not keep:
                self._ring.remove(t)
                del self._tenants[t.key]

    # -- control messages ------------------------------------------------------------------------
    def _control(self, p: _Proc, msg: bytes, fds: list[int]) -> None:
        """Send a control message and mark its place among the jobs with a CONTROL record."""
        if not p.up:
            return  # a dead worker: its replacement gets every map and key from `_spawn`
        p.unsent.append((msg, fds))
        self._drain(p)
        self._put(p, None, None)
        self._doorbell(p)

    def _drain(self, p: _Proc) -> None:
        while p.unsent:
            msg, fds = p.unsent[0]
            try:
                send_packet(p.sock, msg, fds)
            except BlockingIOError:
                if not p.writer_armed and self._loop is not None:
                    p.writer_armed = True
                    self._loop.add_writer(p.sock.fileno(), self._on_writable, p)
                return
            except OSError:
                return  # the reader sees the death and restarts the worker
            p.unsent.popleft()

    def _on_writable(self, p: _Proc) -> None:
        p.writer_armed = False
        assert self._loop is not None
        self._loop.remove_writer(p.sock.fileno())
        self._drain(p)

    # -- completions and deaths ------------------------------------------------------------------
    def _on_done(self, p: _Proc) -> None:
        """The worker announced completions: resolve their futures, refill its ring and window."""
        if self._collect(p) and p.up:
            if p.backlog:
                while p.backlog and len(p.inflight) < p.ring.slots:
                    self._write(p, *p.backlog.popleft())
            self._pump()

    def _collect(self, p: _Proc) -> int:
        """Resolve the completions the worker announced; returns how many."""
        try:
            n = os.eventfd_read(p.ring.done_efd)
        except (BlockingIOError, OSError):
            return 0
        mem, slots, base, inflight, key_jobs = p.ring.mem, p.ring.slots, p.ring.done_base, p.inflight, self._key_jobs
        done, load, busy_ns, jobs, nbytes = p.done, p.load, p.busy_ns, p.jobs, p.bytes
        try:
            for _ in range(min(n, len(inflight))):
                job_id, busy, status = _unpack_done(mem, base + (done % slots) * _DONE_SLOT)
                done += 1
                entry = inflight.popleft()
                if entry is None:
                    continue  # a CONTROL record
                jid, fut, length, key_id = entry
                if jid != job_id:  # never: a worker runs its ring in order; treat it as a dead worker
                    inflight.appendleft(entry)  # failed with the rest when the death is seen
                    p.proc.kill()
                    return n
                load -= length + JOB_OVERHEAD
                busy_ns += busy
                jobs += 1
                nbytes += length
                left = key_jobs[key_id] - 1
                if left:
                    key_jobs[key_id] = left
                else:
                    key_jobs[key_id] = 1
                    self._job_done(key_id)
                if fut.done():
                    continue
                if status == _OK:
                    fut.set_result(None)
                elif status == _TAG:
                    fut.set_exception(TagMismatch("D2H authentication tag mismatch"))
                else:
                    fut.set_exception(JobError(f"worker {p.index} could not run job {job_id}"))
        finally:
            p.done, p.load, p.busy_ns, p.jobs, p.bytes = done, load, busy_ns, jobs, nbytes
        return n

    def _on_socket(self, p: _Proc) -> None:
        """The worker never writes its socket: readable means it is gone."""
        try:
            data = p.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._worker_died(p)

    def _fail_outstanding(self, p: _Proc, why: str) -> None:
        entries = [*p.inflight, *(entry for _fields, entry in p.backlog)]
        p.inflight.clear()
        p.backlog.clear()
        p.load = 0
        for entry in entries:
            if entry is None:
                continue
            _jid, fut, _n, key_id = entry
            self._job_done(key_id)
            if not fut.done():
                fut.set_exception(WorkerLost(why))

    def _worker_died(self, p: _Proc) -> None:
        self._collect(p)  # what it finished and announced before it died stands
        self._detach(p)
        p.up = False
        self._live = [q for q in self._procs if q.up]
        code = p.proc.poll()
        if self.closed:
            return
        lost = sum(e is not None for e in p.inflight) + sum(e is not None for _f, e in p.backlog)
        self._fail_outstanding(p, f"crypto worker {p.index} (pid {p.proc.pid}) died with {code}")
        p.ring.close()
        p.unsent.clear()
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
        self._live = [q for q in self._procs if q.up]
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
            + sum(q[1] - JOB_OVERHEAD for t in self._ring for q in t.jobs),
            "utilisation": [round(p.busy_ns / wall_ns, 4) for p in self._procs],
            "pids": self.pids(),
        }
