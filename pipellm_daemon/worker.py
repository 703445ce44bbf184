"""A crypto worker process: AES-GCM straight from shared memory to shared memory, nothing else.

Started by the daemon with one end of a SOCK_SEQPACKET socketpair (control messages) and its ring (a memfd
and two eventfds, see `jobwire`) as arguments; it runs the ring's records in order. It imports only the
standard library, `cryptography`, the SDK's `crypto` module (the one door to AES-GCM: its
`open_into` never decrypts straight from the host-writable arena) and its `wire` module (descriptor
packing; pure, no protobuf until asked for a mode), refuses to dump core (it holds keys),
dies with its parent, and never logs data or keys.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import mmap
import os
import resource
import select
import signal
import socket
import sys
import time


def _crypto_without_sdk() -> None:
    """Run as a worker, import `pipellm_client.crypto` without the SDK's `__init__`.

    That `__init__` pulls in grpc and numpy (about 0.3 s and tens of MB per worker, paid again on every
    restart); the worker needs only `crypto`, `keymem`, `errors` and `wire`. The package is registered
    unexecuted, so only its submodules load. Never done on import (tests, the daemon), where the real
    package may be needed.
    """
    if "pipellm_client" in sys.modules:
        return
    spec = importlib.util.find_spec("pipellm_client")
    if spec is not None and spec.submodule_search_locations is not None:
        sys.modules["pipellm_client"] = importlib.util.module_from_spec(spec)


if __name__ == "__main__":
    _crypto_without_sdk()

from pipellm_client import crypto, keymem  # noqa: E402
from pipellm_client.errors import TagMismatch  # noqa: E402
from pipellm_client.wire import ancillary_space, received_fds  # noqa: E402

from pipellm_daemon import jobwire as w  # noqa: E402

# Completions are held back (one doorbell for several) only while more than LOW_WATER jobs are still
# queued, and for at most HOLD_NS of work: the daemon hears in time to refill, and a wake-up of the daemon
# (tens of µs of CPU on a small VM, taken from the cores the workers run on) is paid once per few jobs.
HOLD_NS = 500_000
LOW_WATER = 1
_SEAL = int(w.Kind.SEAL)
_OK, _TAG, _ERROR = int(w.Status.OK), int(w.Status.TAG), int(w.Status.ERROR)
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def _harden() -> None:
    """No core dumps, no ptrace, death with the daemon; and all memory locked where the daemon's is (the
    same limits are inherited, so both reach the same answer), so OpenSSL's key schedules stay off swap."""
    keymem.lock_all_memory()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Worker:
    def __init__(self, sock: socket.socket, ring: w.Ring | None = None) -> None:
        self.sock = sock
        self.ring = ring
        self.maps: dict[int, memoryview] = {}
        self._mmaps: dict[int, mmap.mmap] = {}
        self.keys: dict[int, crypto.Aead] = {}

    def handle(self, msg: bytes, fds: list[int]) -> None:
        """One control message (MAP with its fd, UNMAP, KEY, DROP_KEY)."""
        op = msg[0]
        if op == w.Op.MAP:
            _, handle, size, writable = w.MAP.unpack(msg)
            fd = fds.pop(0)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            try:
                m = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
            finally:
                os.close(fd)
            keymem.exempt(m, size)  # region and arena pages hold no keys: not pinned by mlockall
            self._drop_map(handle)
            self._mmaps[handle] = m
            self.maps[handle] = memoryview(m)
        elif op == w.Op.UNMAP:
            self._drop_map(w.HANDLE.unpack(msg)[1])
        elif op == w.Op.KEY:
            _, key_id, key = w.KEY.unpack(msg)
            self.keys[key_id] = crypto.new_aead(key)
            del key
        elif op == w.Op.DROP_KEY:
            self.keys.pop(w.HANDLE.unpack(msg)[1], None)

    def _drop_map(self, handle: int) -> None:
        view = self.maps.pop(handle, None)
        if view is not None:
            view.release()
            self._mmaps.pop(handle).close()

    def run(self, job: w.Job) -> w.Status:
        return w.Status(self._run(job.job_id, job.kind, job.key_id, job.nonce, *job[4:]))

    def _run(
        self, job_id: int, kind: int, key_id: int, nonce: bytes, sh: int, so: int, n: int, dh: int, do: int
    ) -> int:
        """One job; its `Status` as an int (plain ints on the per-job path: no enum lookups)."""
        try:
            aead = self.keys[key_id]
            src, dst = self.maps[sh], self.maps[dh]
            if kind == _SEAL:  # the one door to AES-GCM; this process installs no auditor (the pool audits)
                crypto.seal_job(aead, nonce, src[so : so + n], dst[do : do + n + 16])
            else:
                # The slot is in the host-writable arena: open_into reads it once, through private memory,
                # and wipes the region's bytes if the tag fails.
                try:
                    crypto.open_into(aead, nonce, src[so : so + n + 16], dst[do : do + n])
                except TagMismatch:
                    return _TAG
            return _OK
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            print(f"pipellm worker {os.getpid()}: job {job_id} failed: {type(exc).__name__}", file=sys.stderr)
            return _ERROR

    def control(self) -> None:
        """The socket message a CONTROL record stands for (already sent: the daemon sends it first)."""
        msg, anc, _flags, _addr = self.sock.recvmsg(1 << 16, ancillary_space(16))
        if not msg:
            raise EOFError
        fds = received_fds(anc)
        try:
            self.handle(msg, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def serve(self) -> None:
        """Run ring records in order until the daemon's end of the socket closes.

        Completions are announced at once when at most `LOW_WATER` jobs are known to be waiting or the
        job is URGENT, and otherwise once `HOLD_NS` of work has gone unannounced. Idle, the worker sleeps
        in poll(2) on its job eventfd and the socket (no spinning: the daemon's doorbell wakes it).
        """
        ring = self.ring
        assert ring is not None
        mem, slots, done_base = ring.mem, ring.slots, ring.done_base
        job_efd, done_efd = ring.job_efd, ring.done_efd
        unpack_job, pack_done = w.JOB.unpack_from, w.DONE.pack_into
        run, clock, eventfd_read, eventfd_write = self._run, time.perf_counter_ns, os.eventfd_read, os.eventfd_write
        op_job, op_control, urgent, kind_mask = int(w.Op.JOB), int(w.Op.CONTROL), w.URGENT, w.KIND_MASK
        job_slot, done_slot = w.JOB_SLOT, w.DONE_SLOT
        poller = select.poll()
        poller.register(job_efd, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        cursor = known = unannounced = 0
        quiet_since = clock()
        while True:
            if not known:
                if unannounced:
                    eventfd_write(done_efd, unannounced)
                    unannounced = 0
                try:
                    known = eventfd_read(job_efd)
                except BlockingIOError:
                    events = poller.poll()
                    if any(fd != job_efd for fd, _ev in events):
                        return  # the daemon closed its end (or died: PDEATHSIG covers that too)
                    continue
                quiet_since = clock()
            slot = cursor % slots
            op, kind, job_id, key_id, nonce, sh, so, n, dh, do = unpack_job(mem, slot * job_slot)
            t0 = clock()
            if op == op_job:
                status = run(job_id, kind & kind_mask, key_id, nonce, sh, so, n, dh, do)
            elif op == op_control:
                try:
                    self.control()
                except (EOFError, ConnectionResetError):
                    return
                status = _OK
            else:  # never: only the daemon writes the ring
                status = _ERROR
            t1 = clock()
            pack_done(mem, done_base + slot * done_slot, job_id, t1 - t0, status)
            cursor += 1
            known -= 1
            unannounced += 1
            if known <= LOW_WATER:
                try:  # noqa: SIM105 (contextlib.suppress costs more than this per job)
                    known += eventfd_read(job_efd)  # more may have been announced meanwhile
                except BlockingIOError:
                    pass
            if known <= LOW_WATER or kind & urgent or t1 - quiet_since >= HOLD_NS:
                eventfd_write(done_efd, unannounced)
                unannounced = 0
                quiet_since = t1


def main() -> None:
    _harden()
    sock_fd, ring_fd, job_efd, done_efd, slots = (int(a) for a in sys.argv[1:6])
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(True)
    Worker(sock, w.Ring(ring_fd, job_efd, done_efd, slots)).serve()


if __name__ == "__main__":
    main()
