"""The daemon's lifecycle: sd_notify from the main process only, and nothing leaks when start fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration


def _workers_of(pid: int) -> list[psutil.Process]:
    with_children = psutil.Process(pid).children()
    return [p for p in with_children if "pipellm_daemon.worker" in " ".join(p.cmdline())]


def test_notify_protocol_and_workers_do_not_inherit_the_socket() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        notify = os.path.join(tmp, "notify")
        rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        rx.bind(notify)
        rx.settimeout(60)
        sock = os.path.join(tmp, "pipellmd.sock")
        env = dict(os.environ, NOTIFY_SOCKET=notify, PIPELLM_WORKERS="2", PIPELLM_POOL_BYTES=str(256 << 20))
        env["PIPELLM_ALLOWED_UIDS"] = str(os.getuid())
        proc = subprocess.Popen([sys.executable, "-m", "pipellm_daemon", "--socket", sock], env=env)
        try:
            msg = rx.recv(4096).decode()
            assert msg.startswith("READY=1\n") and "STATUS=serving on" in msg, msg
            workers = _workers_of(proc.pid)
            assert len(workers) == 2
            for w in workers:  # only the main process may notify (NotifyAccess=main)
                assert b"NOTIFY_SOCKET=" not in Path(f"/proc/{w.pid}/environ").read_bytes()
            proc.send_signal(signal.SIGTERM)
            assert rx.recv(4096).decode().startswith("STOPPING=1")
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            rx.close()


def test_a_failed_start_leaves_no_worker_behind() -> None:
    """The control socket cannot be bound (its directory is missing) after the workers have started."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "missing", "pipellmd.sock")
        env = dict(os.environ, PIPELLM_WORKERS="2", PIPELLM_POOL_BYTES=str(256 << 20))
        env["PIPELLM_ALLOWED_UIDS"] = str(os.getuid())
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipellm_daemon", "--socket", sock], env=env, stderr=subprocess.PIPE
        )
        seen: set[int] = set()
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                seen.update(p.pid for p in _workers_of(proc.pid))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0, err
        time.sleep(0.5)
        alive = [pid for pid in seen if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        assert alive == [], f"worker processes leaked: {alive}"
