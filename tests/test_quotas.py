"""Per-uid quotas, bounded queues and tenant visibility, attacked through real pipellmd processes.

Each attack is what a tenant admitted by allowed_uids could do to the others: open connections or
sessions in a loop, register regions or queue commits without end, stop reading its sockets, watch or
list other tenants' sessions, hand the daemon a device-staging geometry that aims its copies elsewhere.
"Another uid" is a child process that drops to that uid (the tests run as root), so those need root.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from pipellm_client import Client, DaemonError
from pipellm_client._core import Handshake, swap_order_value
from pipellm_client._dataplane import DaemonUnavailable, FrameSocket
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from pipellm_client.client import _welcome
from pipellm_client.wire import TICKET_KEY

from pipellm_daemon.launcher import DaemonProcess

pytestmark = pytest.mark.integration

C = grpc.StatusCode
MiB = 1 << 20
UID_A, UID_B, UID_ADMIN = 4242, 4343, 4444
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
# Small arenas: session opens stay cheap, so loops of them do not dominate the run time.
SMALL = {"workers": 1, "pool_bytes": 256 * MiB, "chunk_size": 256 << 10, "h2d_slots": 4, "d2h_slots": 2,
         "demand_slots": 1}  # fmt: skip


@contextlib.contextmanager
def tenant_daemon(**settings: Any) -> Iterator[DaemonProcess]:
    """A daemon that root and the test uids may reach (directory 0755, sockets 0666, all uids allowed)."""
    merged = {**SMALL, "allowed_uids": (0, UID_A, UID_B, UID_ADMIN), "socket_mode": "0o666", **settings}
    with DaemonProcess(**merged) as d:
        os.chmod(d.dir, 0o755)
        yield d


_PRELUDE = """
import json, os, sys, threading, time
import grpc
import numpy as np
from pipellm_client import Client, DaemonError
from pipellm_client._dataplane import DaemonUnavailable, FrameSocket
from pipellm_client.client import _welcome
from pipellm_client.ctl.main import main as ctl_main
uid, sock = int(sys.argv[1]), sys.argv[2]
os.setgroups([]); os.setgid(uid); os.setuid(uid)
def out(**kw):
    print(json.dumps(kw), flush=True)
"""


def as_uid(uid: int, sock: str, body: str) -> subprocess.Popen[str]:
    """Run `body` in a fresh Python that has dropped to `uid` (imports happen as root, before the drop)."""
    return subprocess.Popen(
        [sys.executable, "-c", _PRELUDE + textwrap.dedent(body), str(uid), sock],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def result(proc: subprocess.Popen[str], timeout: float = 30) -> dict[str, Any]:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr
    return dict(json.loads(stdout.strip().splitlines()[-1]))


def line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    text = proc.stdout.readline()
    assert text, proc.stderr.read() if proc.stderr else "child ended"
    return dict(json.loads(text))


def greet(sock: str) -> tuple[FrameSocket, pb.Frame]:
    fs = FrameSocket(sock, timeout=10)
    frame, fds = fs.recv()
    for fd in fds:
        os.close(fd)
    return fs, frame


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


# -- connections ------------------------------------------------------------------------------------


@needs_root
def test_connect_loop_hits_the_per_uid_limit_and_others_still_connect() -> None:
    with tenant_daemon(max_connections_per_uid=4, connect_rate_per_uid=20.0) as d:
        held = []
        for _ in range(4):
            fs, frame = greet(d.socket)
            assert frame.WhichOneof("body") == "welcome"
            held.append(fs)
        for _ in range(20):  # the loop goes on: every further one is refused, before any key is made
            fs, frame = greet(d.socket)
            assert frame.WhichOneof("body") == "error", frame
            assert frame.error.code == C.RESOURCE_EXHAUSTED.value[0]
            assert "max_connections_per_uid=4" in frame.error.message
            fs.close()
        with pytest.raises(DaemonError) as info:  # what the SDK raises: a precise, typed refusal
            Client(d.socket, timeout=10).status()
        assert info.value.code == C.RESOURCE_EXHAUSTED and "max_connections_per_uid" in info.value.details
        other = result(
            as_uid(
                UID_A,
                d.socket,
                """
                fs = FrameSocket(sock, timeout=10)
                frame, _ = fs.recv()
                c = Client(sock, timeout=10)
                out(body=frame.WhichOneof("body"), healthy=c.status().healthy)
                """,
            )
        )
        assert other == {"body": "welcome", "healthy": True}
        assert '"connection_refused"' in d.log()
        held.pop().close()
        time.sleep(0.2)
        fs, frame = greet(d.socket)  # a freed place can be used again
        assert frame.WhichOneof("body") == "welcome"
        held.append(fs)
        for fs in held:
            fs.close()
        time.sleep(0.3)
        # connect_rate_per_uid: a connect/close loop gets its keys at 20/s (bursts of 4), not as fast as
        # it can knock, so it cannot burn the daemon's CPU on P-384 key generation.
        t0 = time.monotonic()
        for _ in range(24):
            fs, frame = greet(d.socket)
            assert frame.WhichOneof("body") == "welcome", frame
            fs.close()
            time.sleep(0.01)  # (let the daemon see the hang-up: this loop tests the rate, not the limit)
        assert time.monotonic() - t0 >= 0.7  # (24 - 4) / 20 per second; without a rate: about 0.25 s


# -- sessions, regions, in-flight bytes, queued commits ------------------------------------------------


@needs_root
def test_session_region_and_inflight_quotas_refuse_precisely() -> None:
    settings = {
        "max_sessions_per_uid": 2,
        "max_regions_per_uid": 3,
        "max_region_bytes_per_uid": 8 * MiB,
        "max_inflight_bytes_per_uid": 2 * MiB,
        "max_queued_commits": 2,
    }
    with tenant_daemon(**settings) as d, Client(d.socket) as c:
        s1, s2 = c.open_session("one"), c.open_session("two")
        with pytest.raises(DaemonError) as info:
            c.open_session("three")
        assert info.value.code == C.RESOURCE_EXHAUSTED
        assert "uid 0 already has 2 sessions open (max_sessions_per_uid=2)" in info.value.details
        other = result(as_uid(UID_A, d.socket, "c = Client(sock); s = c.open_session('a'); out(sid=s.id)"))
        assert other["sid"]  # another uid's quota is its own

        r1 = s1.alloc_region(4 * MiB, readonly=True, data=np.arange(4 * MiB, dtype=np.uint8))
        s2.alloc_region(3 * MiB)
        with pytest.raises(DaemonError) as info:  # 7 MiB + 2 MiB > 8 MiB
            s2.alloc_region(2 * MiB)
        assert info.value.code == C.RESOURCE_EXHAUSTED and "max_region_bytes_per_uid" in info.value.details
        r3 = s2.alloc_region(1 * MiB)  # exactly 8 MiB, 3 regions
        with pytest.raises(DaemonError) as info:  # across both sessions of the uid
            s1.alloc_region(4096)
        assert info.value.code == C.RESOURCE_EXHAUSTED
        assert "already has 3 regions registered (max_regions_per_uid=3)" in info.value.details
        fds = psutil.Process(d.pid).num_fds()
        for _ in range(10):  # refused registrations do not keep the memfds they offered
            with pytest.raises(DaemonError):
                s1.alloc_region(4096)
        assert psutil.Process(d.pid).num_fds() <= fds + 3
        s2.unregister(r3)
        s1.alloc_region(4096)  # a freed region gives its place and bytes back

        dst = np.empty(3 * MiB, np.uint8)
        with pytest.raises(DaemonError) as info:
            s1.h2d(r1, 0, 3 * MiB, dst)
        assert info.value.code == C.RESOURCE_EXHAUSTED and "max_inflight_bytes_per_uid" in info.value.details
        s1.h2d(r1, 0, MiB, dst[:MiB])  # within the quota it works, and the refused commit left no charge
        assert np.array_equal(dst[:MiB], np.arange(MiB, dtype=np.uint8))

        # max_queued_commits: the daemon is stopped while 6 commits arrive, so it reads them in one go.
        fs = s1.fs
        os.kill(d.pid, signal.SIGSTOP)
        try:
            for seq in range(1001, 1007):
                t = pb.Transfer(region_id=r1.id, offset=0, length=256 << 10)
                fs.send(pb.Frame(commit=pb.Commit(seq=seq, transfers=[t])))
        finally:
            os.kill(d.pid, signal.SIGCONT)
        refused: dict[int, str] = {}
        deadline = time.monotonic() + 10
        while len(refused) < 4 and time.monotonic() < deadline:
            frame, fds = fs.recv()
            for fd in fds:
                os.close(fd)
            if frame.WhichOneof("body") == "error":
                assert frame.error.code == C.RESOURCE_EXHAUSTED.value[0], frame
                refused[frame.error.seq] = frame.error.message
        assert sorted(refused) == [1003, 1004, 1005, 1006]
        assert all("max_queued_commits=2" in m for m in refused.values())
        fs.close()  # (this session's stream now holds raw completions; end it with its connection)
        s2.close()
        assert c.open_session("again").id  # the closed sessions gave their places back


# -- a client that stops reading ------------------------------------------------------------------------


@needs_root
def test_client_that_never_reads_is_disconnected_and_daemon_memory_stays_bounded() -> None:
    with tenant_daemon(max_outbox_bytes=256 << 10) as d:
        Client(d.socket).status()  # warm: the first gRPC call allocates
        before = rss(d.pid)
        fs, frame = greet(d.socket)
        assert frame.WhichOneof("body") == "welcome"
        # Every Release without a session earns an Error frame the client never reads.
        junk = pb.Frame(version=1, release=pb.Release()).SerializeToString()
        sent, disconnected = 0, False
        fs.sock.settimeout(10)
        while sent < 300_000:
            try:
                fs.sock.send(junk)
            except (BrokenPipeError, ConnectionResetError):
                disconnected = True
                break
            sent += 1
        grown = rss(d.pid) - before
        assert disconnected, f"the daemon kept buffering {sent} unread answers"
        assert grown < 32 * MiB, grown
        assert '"outbox_overflow"' in d.log()
        fs.close()
        assert Client(d.socket).status().healthy  # and it serves everyone else as before


# -- Watch --------------------------------------------------------------------------------------------


@needs_root
def test_watchers_that_never_read_are_bounded() -> None:
    with tenant_daemon(max_watches_per_uid=2) as d, Client(d.socket) as c:
        c.status()
        md = [(TICKET_KEY, c._ticket)]
        stub = pb_grpc.PipeLLMStub(grpc.insecure_channel("unix:" + d.socket))
        streams = [stub.Watch(pb.WatchRequest(), metadata=md) for _ in range(2)]  # never read
        time.sleep(0.3)
        third = stub.Watch(pb.WatchRequest(), metadata=md, timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            next(third)
        assert info.value.code() == C.RESOURCE_EXHAUSTED and "max_watches_per_uid" in (info.value.details() or "")
        before = rss(d.pid)
        for i in range(150):  # 300 events for each silent watcher, whose backlog holds 256
            c.open_session(f"churn-{i}").close()
        grown = rss(d.pid) - before
        assert grown < 48 * MiB, grown
        got = next(streams[0])  # the stream still works; it lost events, not the daemon its memory
        assert got.kind == "session_opened"
        for s in streams:
            s.cancel()
        deadline = time.monotonic() + 5
        while True:  # a cancelled stream gives its place back
            again = stub.Watch(pb.WatchRequest(), metadata=md)
            c.open_session("after").close()
            try:
                assert next(again).kind == "session_opened"
                again.cancel()
                break
            except grpc.RpcError as exc:
                assert exc.code() == C.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)


# -- tenant visibility ------------------------------------------------------------------------------


def _ctl_sessions_as(uid: int, sock: str) -> list[int]:
    body = """
    import contextlib, io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = ctl_main(["--socket", sock, "sessions", "--json"])
    out(code=code, uids=[s["uid"] for s in json.loads(buf.getvalue())["sessions"]])
    """
    r = result(as_uid(uid, sock, body))
    assert r["code"] == 0
    return list(r["uids"])


@needs_root
def test_tenants_see_only_their_own_sessions_admins_see_all() -> None:
    with tenant_daemon(admin_uids=(0, UID_ADMIN)) as d, Client(d.socket) as root:
        b = as_uid(
            UID_B,
            d.socket,
            """
            c = Client(sock); s = c.open_session("tenant-b")
            out(sid=s.id)
            sys.stdin.readline()
            """,
        )
        sid_b = line(b)["sid"]
        a = as_uid(
            UID_A,
            d.socket,
            """
            c = Client(sock)
            mine = c.open_session("tenant-a")
            events = []
            def watch():
                for ev in c.watch():
                    events.append((ev.kind, ev.session_id))
            threading.Thread(target=watch, daemon=True).start()
            time.sleep(0.5)
            out(sid=mine.id)
            sys.stdin.readline()          # meanwhile root opens and closes a session
            s2 = c.open_session("tenant-a-2"); s2.close()
            deadline = time.monotonic() + 10
            while ("session_closed", s2.id) not in events and time.monotonic() < deadline:
                time.sleep(0.05)
            out(own=[mine.id, s2.id], listed=[[s.session_id, s.uid] for s in c.list_sessions()],
                status=[[s.session_id, s.uid] for s in c.status().sessions], events=events)
            """,
        )
        sid_a = line(a)["sid"]
        root_events: list[tuple[str, str]] = []

        def watch_as_root() -> None:
            with contextlib.suppress(DaemonUnavailable, DaemonError):
                for ev in Client(d.socket).watch():
                    root_events.append((ev.kind, ev.session_id))

        threading.Thread(target=watch_as_root, daemon=True).start()
        time.sleep(0.5)
        theirs = root.open_session("root-session")
        theirs.close()
        assert a.stdin is not None
        a.stdin.write("go\n")
        a.stdin.flush()
        seen = result(a)
        own = set(seen["own"])
        assert seen["listed"] == [[sid_a, UID_A]]  # not B's, not root's
        assert seen["status"] == [[sid_a, UID_A]]
        assert ("session_closed", seen["own"][1]) in [tuple(e) for e in seen["events"]]
        assert {sid for _k, sid in seen["events"] if sid} <= own, seen["events"]  # not root's session
        # Admins: root (and the daemon's own uid) and the uids in admin_uids see every tenant.
        listed = {s.session_id: s.uid for s in root.list_sessions()}
        assert listed[sid_b] == UID_B
        assert {s.session_id for s in root.status().sessions} >= {sid_b}
        deadline = time.monotonic() + 5
        while ("session_closed", seen["own"][1]) not in root_events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("session_opened", theirs.id) in root_events and ("session_closed", seen["own"][1]) in root_events
        # pipellmctl: a tenant's own sessions; all of them for an admin uid.
        assert _ctl_sessions_as(UID_B, d.socket) == [UID_B]
        assert _ctl_sessions_as(UID_ADMIN, d.socket) == [UID_B]
        assert b.stdin is not None
        b.stdin.write("done\n")
        b.stdin.flush()
        b.communicate(timeout=20)


# -- device staging ------------------------------------------------------------------------------


@needs_root
def test_device_staging_with_a_geometry_the_session_does_not_need_is_invalid() -> None:
    with tenant_daemon() as d:
        stub = pb_grpc.PipeLLMStub(grpc.insecure_channel("unix:" + d.socket))
        fs = FrameSocket(d.socket, timeout=10)
        welcome = _welcome(fs)
        md = [(TICKET_KEY, welcome.ticket)]
        hs = Handshake(welcome.daemon_public_key, 2)
        req = hs.request(client_name="cuda", endpoint="cuda", swap_order=swap_order_value("fifo"))
        resp = stub.OpenSession(req, metadata=md, timeout=10)
        g = resp.arena
        stride = -(-(g.chunk_size + 16) // 256) * 256  # what the SDK's DeviceStaging uses
        handle = bytes(64)

        def attach(size: int, stride: int) -> grpc.StatusCode:
            r = pb.AttachDeviceStagingRequest(
                session_id=resp.session_id, ipc_handle=handle, size=size, stride=stride, device=0
            )
            try:
                stub.AttachDeviceStaging(r, metadata=md, timeout=10)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return C.OK

        huge = 1 << 30  # copies to slot i would land at i GiB: far past a real staging buffer
        assert attach(huge * g.h2d_slots, huge) == C.INVALID_ARGUMENT
        assert attach(stride * g.h2d_slots + 4096, stride) == C.INVALID_ARGUMENT
        assert attach(stride * (g.h2d_slots - 1), stride) == C.INVALID_ARGUMENT
        assert attach(g.chunk_size * g.h2d_slots, g.chunk_size) == C.INVALID_ARGUMENT  # no room for tags
        # The geometry the session needs passes validation (it then fails only for want of CUDA here).
        assert attach(stride * g.h2d_slots, stride) != C.INVALID_ARGUMENT
        fs.close()


# -- the sockets' modes --------------------------------------------------------------------------------


def test_control_socket_has_its_mode_the_moment_it_exists(tmp_path: Path) -> None:
    import asyncio

    from pipellm_daemon.server import bind_control_socket

    async def bind() -> int:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        path = str(tmp_path / "s.sock")
        old = os.umask(0)  # the most permissive inherited umask
        try:
            bind_control_socket(server, path, 0o660)
            mode = stat.S_IMODE(os.stat(path).st_mode)  # right after bind, before start
        finally:
            os.umask(old)
        await server.stop(None)
        return mode

    assert asyncio.run(bind()) == 0o660


def test_daemon_sockets_are_never_world_connectable() -> None:
    """Started under umask 0, both sockets are 0660 from the first moment anyone could see them."""
    with tempfile.TemporaryDirectory(prefix="pipellmd-") as tmp:
        sock = os.path.join(tmp, "pipellmd.sock")
        seen: dict[str, set[int]] = {sock: set(), sock + ".data": set()}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                for path, modes in seen.items():
                    with contextlib.suppress(FileNotFoundError):
                        modes.add(stat.S_IMODE(os.lstat(path).st_mode))

        t = threading.Thread(target=poll, daemon=True)
        t.start()
        old = os.umask(0)
        try:
            d = DaemonProcess(directory=tmp, workers=1, pool_bytes=64 * MiB, chunk_size=64 << 10, h2d_slots=2,
                              d2h_slots=1, demand_slots=1)  # fmt: skip
            d.start()
        finally:
            os.umask(old)
        try:
            time.sleep(0.2)
        finally:
            stop.set()
            t.join()
            d.stop()
        assert seen == {sock: {0o660}, sock + ".data": {0o660}}, seen


def test_unit_raises_the_descriptor_limit() -> None:
    unit = (Path(__file__).resolve().parent.parent / "deploy" / "pipellmd.service").read_text()
    limits = [ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("LimitNOFILE=")]
    assert len(limits) == 1 and int(limits[0]) >= 4 * 1024  # above max_connections, with room for regions


def test_quota_settings_are_validated() -> None:
    from pipellm_daemon import config

    cfg = config.load(env={"PIPELLM_MAX_SESSIONS_PER_UID": "3", "PIPELLM_ADMIN_UIDS": "0,1000"})
    assert cfg.max_sessions_per_uid == 3 and cfg.admin_uids == (0, 1000)
    for name, bad in [("max_connections_per_uid", "0"), ("connect_rate_per_uid", "0"), ("max_outbox_bytes", "4096")]:
        with pytest.raises(config.ConfigError, match=name):
            config.load(env={"PIPELLM_" + name.upper(): bad})
