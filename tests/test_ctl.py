"""pipellmctl, run as a real command against a real pipellmd: output, JSON shape and exit codes.

Every test spawns the CLI as a separate process (what operators and probes do), so argument parsing,
the console entry point and the exit status are all part of what is checked.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipellm_client import Client
from pipellm_client.ctl.exitcodes import Exit

pytestmark = pytest.mark.integration

CTL = [sys.executable, "-m", "pipellm_client.ctl"]
HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def run(argv: list[str], timeout: float = 30.0, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw
    )


def ctl(socket: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return run([*CTL, "--socket", socket, *args], timeout)


def small_workload(client: Client, name: str = "ctl-test") -> Any:
    """Open a session and move a few MiB so the counters are not all zero; the session stays open."""
    s = client.open_session(name)
    n = 2 << 20
    w = s.alloc_region(n, readonly=True, name="w", data=np.arange(n, dtype=np.uint8))
    dst = np.zeros(n, np.uint8)
    for _ in range(2):
        s.h2d(w, 0, n, dst)
    assert (dst == np.arange(n, dtype=np.uint8)).all()
    return s


@pytest.fixture
def client(daemon: Any) -> Iterator[Client]:
    with Client(daemon.socket) as c:
        yield c


def test_status_table(daemon, client):
    s = small_workload(client)
    r = ctl(daemon.socket, "status")
    assert r.returncode == Exit.OK, r.stderr
    out = r.stdout
    assert f"pipellmd 0.1.0 at {daemon.socket}" in out
    assert re.search(r"^state\s+healthy$", out, re.M)
    assert re.search(r"^mode\s+pipellm ", out, re.M)
    assert "NO ENCRYPTION" not in out
    assert re.search(r"^uptime\s+\d", out, re.M)
    assert re.search(r"^workers\s+2 process workers", out, re.M)
    assert re.search(r"^hit rate\s+\d+\.\d%", out, re.M)
    assert re.search(r"^throughput\s+", out, re.M)
    assert re.search(r"^encrypted\s+\d", out, re.M)
    assert "SESSIONS (1)" in out and s.id in out and "ctl-test" in out
    assert "CHANNELS (4)" in out
    # message counters and key versions, per channel
    row = next(line for line in out.splitlines() if "Lce00_h2d_user" in line)
    cols = row.split()
    assert cols[0] == s.id and cols[3] == "H2D" and cols[4] == "v0"
    assert int(cols[7]) >= 4  # 2 commits x 2 chunks went through the speculative channel
    assert not HEX64.search(out)


def test_status_json(daemon, client):
    s = small_workload(client)
    r = ctl(daemon.socket, "status", "--json")
    assert r.returncode == Exit.OK, r.stderr
    st = json.loads(r.stdout)
    assert {"mode", "sessions", "channels", "pool", "workers"} <= st.keys()
    assert st["mode"] == "pipellm" and st["encrypted"] is True
    assert st["healthy"] is True and st["draining"] is False
    assert [x["session_id"] for x in st["sessions"]] == [s.id]
    # channels: one flat list over all sessions, each tagged with its session
    chans = st["channels"]
    assert len(chans) == 4 and {c["session_id"] for c in chans} == {s.id}
    assert {(c["name"], c["direction"]) for c in chans} == {
        ("Lce00_h2d_user", "h2d"), ("Lce01_h2d_user", "h2d"), ("Lce00_d2h_user", "d2h"), ("Lce01_d2h_user", "d2h"),
    }  # fmt: skip
    assert all(isinstance(c["key_version"], int) and isinstance(c["messages"], int) for c in chans)
    # integers stay integers (proto3 JSON would make uint64 strings)
    totals = st["totals"]
    assert totals["commits"] == 2 and totals["bytes_h2d"] == 2 * (2 << 20)
    assert st["bytes_encrypted"] == totals["bytes_ahead"] + totals["bytes_on_demand"] > 0
    assert st["pool"]["arenas_in_use"] == 1 and st["workers"]["count"] == 2
    assert not HEX64.search(r.stdout)


@pytest.mark.daemon_settings(mode="plain")
def test_plain_mode_is_flagged_loudly(daemon, client):
    r = ctl(daemon.socket, "status")
    assert r.returncode == Exit.OK
    assert r.stdout.startswith("!!! PLAIN MODE: NO ENCRYPTION")
    assert re.search(r"^mode\s+PLAIN — NO ENCRYPTION$", r.stdout, re.M)
    rj = ctl(daemon.socket, "status", "--json")
    st = json.loads(rj.stdout)  # stdout stays pure JSON; the warning goes to stderr
    assert st["mode"] == "plain" and st["encrypted"] is False
    assert "NO ENCRYPTION" in rj.stderr


def test_sessions(daemon, client):
    r = ctl(daemon.socket, "sessions")
    assert r.returncode == Exit.OK and r.stdout.strip() == "no sessions"
    s = small_workload(client, "ctl-sessions")
    r = ctl(daemon.socket, "sessions")
    assert r.returncode == Exit.OK, r.stderr
    header, row = r.stdout.splitlines()
    assert header.split()[:4] == ["SESSION", "CLIENT", "UID", "PID"]
    assert row.split()[:4] == [s.id, "ctl-sessions", str(os.getuid()), str(os.getpid())]
    assert row.split()[-1] == "ok"
    rj = ctl(daemon.socket, "sessions", "--json")
    (sj,) = json.loads(rj.stdout)["sessions"]
    assert sj["session_id"] == s.id and sj["client_name"] == "ctl-sessions"
    assert sj["pid"] == os.getpid() and sj["regions"] == 1 and sj["counters"]["commits"] == 2
    assert sj["endpoint"] == "cpu"


def test_health(daemon):
    r = ctl(daemon.socket, "health")
    assert (r.returncode, r.stdout) == (Exit.OK, "SERVING\n")
    r = ctl(daemon.socket, "health", "--quiet")
    assert (r.returncode, r.stdout) == (Exit.OK, "")
    r = ctl(daemon.socket, "health", "--json")
    assert json.loads(r.stdout) == {"status": "SERVING"}


def test_socket_flag_after_the_verb_and_env_default(daemon):
    r = run([*CTL, "health", "--socket", daemon.socket])
    assert r.returncode == Exit.OK, r.stderr
    env = dict(os.environ, PIPELLM_SOCKET=daemon.socket)
    r = run([*CTL, "sessions"], env=env)
    assert r.returncode == Exit.OK, r.stderr


@pytest.mark.parametrize("verb", ["status", "sessions", "watch", "health"])
def test_unreachable_exits_3(tmp_path, verb):
    sock = str(tmp_path / "nobody-home.sock")
    t0 = time.monotonic()
    r = ctl(sock, verb, "--timeout", "3")
    assert r.returncode == Exit.UNREACHABLE, (r.stdout, r.stderr)
    assert sock in r.stderr or "pipellmd" in r.stderr
    assert r.stdout == ""
    assert time.monotonic() - t0 < 15


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).parent / "pipellmctl"
    if not script.exists():
        pytest.skip(f"no console script at {script} (package not installed with pip)")
    r = run([str(script), "--socket", str(tmp_path / "x.sock"), "status"])
    assert r.returncode == Exit.UNREACHABLE


@pytest.mark.parametrize(
    "args",
    [[], ["frobnicate"], ["status", "--bogus"], ["--timeout", "0", "status"], ["--timeout", "soon", "health"]],
)
def test_bad_usage_exits_2(tmp_path, args):
    r = run([*CTL, "--socket", str(tmp_path / "x.sock"), *args])
    assert r.returncode == Exit.USAGE, (r.stdout, r.stderr)
    assert "usage" in r.stderr or "pipellmctl:" in r.stderr


def test_watch_prints_session_events(daemon):
    proc = subprocess.Popen(
        [*CTL, "--socket", daemon.socket, "watch", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        # The subscription starts some time after the process does, and nothing acknowledges it: keep
        # opening sessions until one is seen (bounded), rather than sleeping and hoping.
        deadline = time.monotonic() + 20
        seen: dict[str, Any] | None = None
        opened: list[str] = []
        with Client(daemon.socket) as c:
            while seen is None and time.monotonic() < deadline:
                with c.open_session("watched") as s:
                    opened.append(s.id)
                try:
                    while True:
                        ev = json.loads(lines.get(timeout=0.5))
                        if ev["kind"] == "session_opened":
                            seen = ev
                            break
                except queue.Empty:
                    pass
        assert seen is not None, f"no session_opened line; stderr: {proc.stderr}"
        assert seen["session_id"] in opened
        assert seen["fields"]["client"] == "watched" and seen["fields"]["pid"] == str(os.getpid())
        assert isinstance(seen["time"], float) and abs(seen["time"] - time.time()) < 60
        ev = json.loads(lines.get(timeout=10))  # the close of the same session follows
        assert ev["kind"] == "session_closed" and ev["session_id"] == seen["session_id"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == Exit.OK, proc.stderr.read() if proc.stderr else ""  # Ctrl-C is the normal way out


def test_watch_human_lines(daemon):
    proc = subprocess.Popen(
        [*CTL, "--socket", daemon.socket, "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 20
        found = ""
        with Client(daemon.socket) as c:
            while not found and time.monotonic() < deadline:
                c.open_session("human").close()
                try:
                    while not found:
                        line = lines.get(timeout=0.5)
                        found = line if " session_opened " in line else ""
                except queue.Empty:
                    pass
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  session_opened  [0-9a-f]{16}  uid ", found), found
        assert "client=human" in found
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_ctrl_c_ends_watch_even_when_started_with_sigint_ignored(daemon):
    """A shell's background job (or a parent that ignores SIGINT) passes SIG_IGN on; Ctrl-C must still work."""
    proc = subprocess.Popen(
        [*CTL, "--socket", daemon.socket, "watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 (only sets a signal)
    )
    try:
        assert proc.stderr is not None
        assert "Ctrl-C to stop" in proc.stderr.readline()  # streaming now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == Exit.OK
    finally:
        if proc.poll() is None:
            proc.kill()


def test_watch_ends_with_exit_3_when_the_daemon_stops(daemon):
    proc = subprocess.Popen(
        [*CTL, "--socket", daemon.socket, "watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    banner: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: banner.put(proc.stderr.readline()), daemon=True).start()  # type: ignore[union-attr]
    try:
        assert banner.get(timeout=15).startswith("watching pipellmd")  # connected; now stop the daemon
        assert daemon.stop() == 0
        rc = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == Exit.UNREACHABLE


def test_no_answer_exits_3_instead_of_hanging(daemon):
    """A stopped (or wedged) daemon still accepts connections in the kernel; the CLI must not hang."""
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for verb in ("status", "health"):
            t0 = time.monotonic()
            r = ctl(daemon.socket, "--timeout", "1", verb, timeout=20)
            assert r.returncode == Exit.UNREACHABLE, (verb, r.stdout, r.stderr)
            assert time.monotonic() - t0 < 10
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert ctl(daemon.socket, "health").returncode == Exit.OK


@pytest.mark.daemon_settings(h2d_slots=4, demand_slots=1, chunk_size=64 << 10, drain_timeout_s=20)
def test_draining_daemon_is_unhealthy_exit_4(daemon):
    """A daemon that got SIGTERM drains in-flight work first: status and health say so with exit 4."""
    c = Client(daemon.socket)
    s = c.open_session("stuck")
    n = 16 * (64 << 10)
    w = s.alloc_region(n, readonly=True, name="w", data=np.ones(n, np.uint8))
    # A commit needing more bounce slots than exist, whose completions we never read: the daemon waits
    # for slot releases, so the commit stays in flight and the drain cannot finish.
    frame, _pending = s.core.commit_frame([(w, 0, n, np.zeros(n, np.uint8), False)])
    s.fs.send(frame)
    time.sleep(0.3)
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        deadline = time.monotonic() + 10
        r = ctl(daemon.socket, "status", "--json")
        while r.returncode != Exit.UNHEALTHY and time.monotonic() < deadline:
            time.sleep(0.1)
            r = ctl(daemon.socket, "status", "--json")
        assert r.returncode == Exit.UNHEALTHY, (r.stdout, r.stderr)
        st = json.loads(r.stdout)
        assert st["draining"] is True and st["healthy"] is False
        text = ctl(daemon.socket, "status")
        assert text.returncode == Exit.UNHEALTHY and re.search(r"^state\s+DRAINING", text.stdout, re.M)
        h = ctl(daemon.socket, "health")
        assert (h.returncode, h.stdout) == (Exit.UNHEALTHY, "NOT_SERVING\n")
    finally:
        s.fs.close()  # the session ends with its connection; the drain completes and the daemon exits
        c.close()
    assert daemon.proc.wait(timeout=20) == 0


def _run_as_nobody(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as uid/gid 65534: import everything as root first (the venv may sit under /root)."""
    code = (
        "import os, sys\n"
        "from pipellm_client.ctl.main import main\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return run([sys.executable, "-c", code, "--socket", socket, *args])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another uid")
def test_permission_denied_by_socket_mode_exits_5(daemon):
    os.chmod(daemon.dir, 0o755)  # let the other uid reach the socket file; its 0660 mode then refuses it
    r = _run_as_nobody(daemon.socket, "status")
    assert r.returncode == Exit.DENIED, (r.stdout, r.stderr)
    assert "permission denied" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another uid")
@pytest.mark.daemon_settings(socket_mode="0o666")
def test_permission_denied_by_peer_credentials_exits_5(daemon):
    os.chmod(daemon.dir, 0o755)  # the socket is world-writable: only SO_PEERCRED stands in the way
    r = _run_as_nobody(daemon.socket, "sessions")
    assert r.returncode == Exit.DENIED, (r.stdout, r.stderr)
    assert "uid 65534 is not allowed" in r.stderr
    assert '"peer_refused"' in daemon.log() and '"uid": 65534' in daemon.log()
