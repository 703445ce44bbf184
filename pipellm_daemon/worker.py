"""A crypto worker process: AES-GCM straight from shared memory to shared memory, nothing else.

Started by the daemon with one end of a SOCK_SEQPACKET socketpair as argv[1]. It imports only the
standard library, `cryptography` and the SDK's `crypto` module (the one door to AES-GCM: its
`open_into` never decrypts straight from the host-writable arena), refuses to dump core (it holds keys),
dies with its parent, and never logs data or keys.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import mmap
import os
import resource
import signal
import socket
import sys
import time


def _crypto_without_sdk() -> None:
    """Run as a worker, import `pipellm_client.crypto` without the SDK's `__init__`.

    That `__init__` pulls in grpc and numpy (about 0.3 s and tens of MB per worker, paid again on every
    restart); the worker needs only `crypto` and `errors`. The package is registered unexecuted, so only
    its submodules load. Never done on import (tests, the daemon), where the real package may be needed.
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

from pipellm_daemon import jobwire as w  # noqa: E402

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
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.maps: dict[int, memoryview] = {}
        self._mmaps: dict[int, mmap.mmap] = {}
        self.keys: dict[int, crypto.Aead] = {}

    def handle(self, msg: bytes, fds: list[int]) -> bytes | None:
        op = msg[0]
        if op == w.Op.JOB:
            return self.run_jobs(msg)
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
        return None

    def _drop_map(self, handle: int) -> None:
        view = self.maps.pop(handle, None)
        if view is not None:
            view.release()
            self._mmaps.pop(handle).close()

    def run_jobs(self, msg: bytes) -> bytes:
        out = bytearray()
        for off in range(0, len(msg), w.JOB.size):
            job = w.Job.unpack_from(msg, off)
            t0 = time.perf_counter_ns()
            status = self.run(job)
            out += w.DONE.pack(job.job_id, status, time.perf_counter_ns() - t0)
        return bytes(out)

    def run(self, job: w.Job) -> w.Status:
        try:
            aead = self.keys[job.key_id]
            src, dst = self.maps[job.src_handle], self.maps[job.dst_handle]
            if job.kind == w.Kind.SEAL:
                aead.encrypt_into(
                    job.nonce,
                    src[job.src_offset : job.src_offset + job.length],
                    dst[job.dst_offset : job.dst_offset + job.length + 16],
                )
            else:
                # The slot is in the host-writable arena: open_into reads it once, through private memory,
                # and wipes the region's bytes if the tag fails.
                try:
                    crypto.open_into(
                        aead,
                        job.nonce,
                        src[job.src_offset : job.src_offset + job.length + 16],
                        dst[job.dst_offset : job.dst_offset + job.length],
                    )
                except TagMismatch:
                    return w.Status.TAG
            return w.Status.OK
        except (KeyError, ValueError, IndexError, TypeError) as exc:
            print(
                f"pipellm worker {os.getpid()}: job {job.job_id} failed: {type(exc).__name__}",
                file=sys.stderr,
            )
            return w.Status.ERROR

    def serve(self) -> None:
        fd_size = socket.CMSG_LEN(16 * 4)
        while True:
            try:
                msg, anc, _flags, _addr = self.sock.recvmsg(1 << 16, fd_size)
            except (ConnectionResetError, InterruptedError):
                return
            if not msg:
                return
            fds: list[int] = []
            for level, typ, data in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.extend(int.from_bytes(data[i : i + 4], sys.byteorder) for i in range(0, len(data), 4))
            reply = self.handle(msg, fds)
            for fd in fds:
                os.close(fd)
            if reply:
                self.sock.sendall(reply)


def main() -> None:
    _harden()
    sock = socket.socket(fileno=int(sys.argv[1]))
    sock.setblocking(True)
    Worker(sock).serve()


if __name__ == "__main__":
    main()
