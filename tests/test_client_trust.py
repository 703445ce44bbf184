"""The SDK's own checks: it talks only to a daemon running as an expected uid, and a session never crosses
a fork (a child using its parent's session would encrypt D2H messages under the parent's nonces)."""

from __future__ import annotations

import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pipellm_client import Client, PipeLLMError
from pipellm_client._dataplane import FrameSocket, UntrustedDaemon, expected_daemon_uids

from pipellm_daemon.launcher import DaemonProcess

NOBODY = 65534


def _impostor(path: str) -> int:
    """A child that listens at `path` as uid 65534 (a stand-in for another local user's process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            srv.bind(path)
            os.chmod(path, 0o777)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            srv.listen(4)  # SO_PEERCRED of a connection names whoever called listen()
            os.write(w, b"k")
            for _ in range(4):
                conn, _ = srv.accept()
                conn.recv(16)
                conn.close()
        finally:
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"k"
    os.close(r)
    return pid


@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="needs root to run a process as another uid")
def test_client_refuses_a_daemon_of_an_unexpected_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIPELLM_DAEMON_UIDS", raising=False)
    assert NOBODY not in expected_daemon_uids()
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp).chmod(0o755)
        control = os.path.join(tmp, "pipellmd.sock")
        pid = _impostor(control + ".data")
        try:
            with pytest.raises(UntrustedDaemon, match=f"uid {NOBODY}"):
                FrameSocket(control, timeout=5)
            with Client(control, timeout=5) as c, pytest.raises(UntrustedDaemon):
                c.open_session("x")  # nothing (no key agreement, no memfd) goes to the impostor
            FrameSocket(control, timeout=5, daemon_uids=frozenset({NOBODY})).sock.close()  # configured: fine
            monkeypatch.setenv("PIPELLM_DAEMON_UIDS", f"{NOBODY}")
            FrameSocket(control, timeout=5).sock.close()
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def test_daemon_uids_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELLM_DAEMON_UIDS", "0,abc")
    with pytest.raises(PipeLLMError, match="PIPELLM_DAEMON_UIDS"):
        expected_daemon_uids()
    monkeypatch.setenv("PIPELLM_DAEMON_UIDS", "0, 998")
    assert expected_daemon_uids() == frozenset({0, 998})


@pytest.mark.integration
def test_a_session_is_refused_in_a_forked_child(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, c.open_session("fork") as s:
        kv = s.alloc_region(1 << 20)
        src = np.full(1 << 20, 3, np.uint8)
        s.d2h(src, kv, 0, wait=True)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = b"?"
            try:
                s.d2h(src, kv, 0, wait=True)
                code = b"used"
            except PipeLLMError as exc:
                code = b"refused" if "forked child" in str(exc) else b"other"
            except BaseException:
                code = b"crash"
            finally:
                os.write(w, code)
                os._exit(0)
        os.close(w)
        got = os.read(r, 16)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == b"refused"
        s.d2h(src, kv, 0, wait=True)  # the parent's session is untouched
        assert (kv.read() == 3).all()
