"""The real pipellmd over its real sockets, driven through the SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from pipellm_client import Client, DaemonError, DaemonUnavailable, Intent
from pipellm_client.errors import InvalidArgument

from .daemon_harness import rand

pytestmark = pytest.mark.integration

SIZES = [1, 15, 16, 17, 4095, 4096, 65_537, 300_000, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, (3 << 20) + 12_345]


@pytest.mark.parametrize("mode", ["pipellm", "naive", "plain"])
def test_round_trips_of_random_sizes_both_directions(mode: str) -> None:
    from pipellm_daemon.launcher import DaemonProcess

    with (
        DaemonProcess(mode=mode, workers=2, pool_bytes=1 << 30) as d,
        Client(d.socket) as c,
        c.open_session("rt", allow_plain=mode == "plain") as s,
    ):
        total = sum(SIZES) + 4096
        data = rand(total, 1)
        w = s.alloc_region(total, readonly=True, name="w", data=data)
        kv = s.alloc_region(total, name="kv")
        off = 0
        for i, n in enumerate(SIZES):
            dst = np.zeros(n, np.uint8)
            s.h2d(w, off, n, dst)
            assert (dst == data[off : off + n]).all(), (mode, n)
            src = rand(n, 100 + i)
            s.d2h(src, kv, off)
            assert (kv.read(off, n) == src).all()
            back = np.zeros(n, np.uint8)
            s.h2d(kv, off, n, back)
            assert (back == src).all()
            off += n
        st = s.status()
        assert st.counters.bytes_d2h == (sum(SIZES) if mode != "plain" else 0)  # plain D2H never reaches it
        assert st.counters.bytes_h2d == 2 * sum(SIZES)


def test_batched_commit_and_status(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("batch") as s:
        data = rand(8 << 20, 2)
        w = s.alloc_region(8 << 20, readonly=True, data=data)
        dsts = [np.zeros(1 << 20, np.uint8) for _ in range(8)]
        for _ in range(3):
            s.h2d_many([(w, i << 20, 1 << 20, dsts[i]) for i in range(8)])
            for i in range(8):
                assert (dsts[i] == data[i << 20 : (i + 1) << 20]).all()
        status = c.status()
        assert status.mode == 1 and len(status.sessions) == 1
        chans = status.sessions[0].channels
        assert {ch.name for ch in chans} == {"Lce00_h2d_user", "Lce00_d2h_user", "Lce01_h2d_user", "Lce01_d2h_user"}
        h2d0 = next(ch for ch in chans if ch.name == "Lce00_h2d_user")
        assert h2d0.messages >= 24 and h2d0.key_version == 0


def test_cyclic_weights_become_hits(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("cycle") as s:
        layers = 12
        data = rand(layers << 20, 3)
        w = s.alloc_region(layers << 20, readonly=True, data=data)
        dst = np.zeros(1 << 20, np.uint8)
        before = None
        for step in range(6):
            if step == 3:
                before = s.status().counters
            for j in range(layers):
                s.h2d(w, j << 20, 1 << 20, dst)
                assert (dst == data[j << 20 : (j + 1) << 20]).all()
        after = s.status().counters
        assert before is not None
        hits = after.hits - before.hits
        judged = hits + (after.misses - before.misses) + (after.skips - before.skips) + (after.late - before.late)
        assert judged == 3 * layers
        assert hits / judged >= 0.95


def test_declared_intents_are_hits_from_the_start(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("intents") as s:
        data = rand(6 << 20, 4)
        w = s.alloc_region(6 << 20, readonly=True, data=data)
        order = [3, 1, 4, 0, 5, 2]
        assert s.declare([Intent(w, j << 20, 1 << 20) for j in order]) == 6
        time.sleep(0.2)  # let the workers encrypt ahead
        dst = np.zeros(1 << 20, np.uint8)
        for j in order:
            s.h2d(w, j << 20, 1 << 20, dst)
            assert (dst == data[j << 20 : (j + 1) << 20]).all()
        cnt = s.status().counters
        assert cnt.hits == 6 and cnt.misses == 0


def test_writes_between_encryption_and_commit_are_never_delivered_stale(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("stale") as s:
        kv = s.alloc_region(4 << 20, name="kv")
        kv.write(0, rand(4 << 20, 5))
        s.declare([Intent(kv, j << 20, 1 << 20) for j in range(4)], cyclic=True)
        dst = np.zeros(1 << 20, np.uint8)
        for step in range(4):
            time.sleep(0.05)
            fresh = rand(1 << 20, 50 + step)
            kv.write(2 << 20, fresh)  # after the daemon encrypted chunk 2 ahead
            for j in range(4):
                s.h2d(kv, j << 20, 1 << 20, dst)
                assert (dst == kv.array[j << 20 : (j + 1) << 20]).all()
            assert (kv.array[2 << 20 : 3 << 20] == fresh).all()
        assert s.status().counters.stale >= 1


def test_two_sessions_are_isolated(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("a") as a, c.open_session("b") as b:
        ra = a.alloc_region(1 << 20, readonly=True, data=rand(1 << 20, 6))
        b.alloc_region(1 << 20, readonly=True, data=rand(1 << 20, 7))
        # b cannot name a's region: the SDK refuses, and the daemon says NOT_FOUND (no existence leak).
        with pytest.raises(InvalidArgument):
            b.h2d(ra, 0, 16, np.zeros(16, np.uint8))
        b.core.regions[ra.id] = ra
        with pytest.raises(DaemonError) as info:
            b.h2d(ra, 0, 16, np.zeros(16, np.uint8))
        assert info.value.code.name == "NOT_FOUND"
        del b.core.regions[ra.id]
        dst = np.zeros(1 << 20, np.uint8)
        a.h2d(ra, 0, 1 << 20, dst)
        assert (dst == ra.array).all()


def test_client_killed_mid_transfer_loses_its_session_only(daemon) -> None:
    script = textwrap.dedent(f"""
        import numpy as np, sys
        from pipellm_client import Client
        c = Client({daemon.socket!r})
        s = c.open_session("victim")
        w = s.alloc_region(64 << 20, readonly=True, data=np.ones(64 << 20, np.uint8))
        dst = np.zeros(64 << 20, np.uint8)
        print("ready", flush=True)
        while True:
            s.h2d(w, 0, 64 << 20, dst)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        with Client(daemon.socket) as c:
            deadline = time.time() + 10
            while time.time() < deadline and not any(x.client_name == "victim" for x in c.list_sessions()):
                time.sleep(0.05)
            time.sleep(0.3)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            deadline = time.time() + 10
            while time.time() < deadline and c.list_sessions():
                time.sleep(0.05)
            assert c.list_sessions() == []
            assert c.status().pool.arenas_in_use == 0
            with c.open_session("survivor") as s:
                w = s.alloc_region(1 << 20, readonly=True, data=rand(1 << 20, 8))
                dst = np.zeros(1 << 20, np.uint8)
                s.h2d(w, 0, 1 << 20, dst)
                assert (dst == w.array).all()
    finally:
        if victim.poll() is None:
            victim.kill()
    assert "session_closed" in daemon.log()


def test_sigterm_drains_in_flight_then_exits_zero(daemon) -> None:
    with Client(daemon.socket) as c:
        s = c.open_session("drain")
        w = s.alloc_region(32 << 20, readonly=True, data=rand(32 << 20, 9))
        dst = np.zeros(32 << 20, np.uint8)
        frame, pending = s.core.commit_frame([(w, 0, 32 << 20, dst, False)])
        s.fs.send(frame)
        os.kill(daemon.pid, signal.SIGTERM)
        s._pump(lambda: pending.done)  # the in-flight transfer still completes
        assert pending.error is None and (dst == w.array).all()
        # New transfers are refused: UNAVAILABLE while it drains, or the connection is already gone.
        with pytest.raises((DaemonError, DaemonUnavailable)) as info:
            s.h2d(w, 0, 16, np.zeros(16, np.uint8))
        assert isinstance(info.value, DaemonUnavailable) or info.value.code.name == "UNAVAILABLE"
        s.fs.close()
    assert daemon.proc.wait(30) == 0
    assert '"event": "stopped"' in daemon.log()


def test_peer_not_allowed_is_refused() -> None:
    """SO_PEERCRED: a uid outside allowed_uids gets PERMISSION_DENIED on the data plane, nothing else."""
    from pipellm_client._dataplane import FrameSocket
    from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

    from pipellm_daemon.launcher import DaemonProcess

    if os.getuid() != 0:
        pytest.skip("needs root to connect as another uid")
    with DaemonProcess(allowed_uids=(12345,), workers=1) as d:
        os.chmod(d.dir, 0o755)
        os.chmod(d.socket + ".data", 0o666)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: become an ordinary user, then knock
            try:
                os.setgid(4242)
                os.setuid(4242)
                fs = FrameSocket(d.socket)
                frame, _ = fs.recv()
                os.write(wfd, frame.SerializeToString())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            reply = pb.Frame.FromString(r.read())
        os.waitpid(pid, 0)
        assert reply.WhichOneof("body") == "error" and reply.error.code == 7  # PERMISSION_DENIED
        assert "uid 4242 is not allowed" in reply.error.message
        # root (and the allowed uids) still get in
        assert Client(d.socket).status().healthy
