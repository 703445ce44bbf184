"""Start pipellmd as a child process on a private socket and wait until it serves (demo, tests, benches)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from pipellm_client.wire import MAX_FRAME, data_socket_path

READY_TIMEOUT_S = 30.0


class DaemonProcess:
    """`with DaemonProcess(mode="naive", workers=1) as d: Client(d.socket)`; settings map to PIPELLM_* env."""

    def __init__(self, directory: str | None = None, log_level: str = "info", **settings: Any) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="pipellmd-")
        self.dir = Path(directory or self._tmp.name)  # type: ignore[union-attr]
        self.socket = str(self.dir / "pipellmd.sock")
        self.log_path = self.dir / "pipellmd.log"
        self.settings = settings
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PIPELLM_ALLOWED_UIDS", str(os.getuid()))
        for k, v in self.settings.items():
            env["PIPELLM_" + k.upper()] = ",".join(str(x) for x in v) if isinstance(v, tuple | list) else str(v)
        return env

    def start(self) -> DaemonProcess:
        since = self.log_path.stat().st_size if self.log_path.exists() else 0  # a reused directory keeps old logs
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipellm_daemon", "--socket", self.socket, "--log-level", self.log_level],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        # Probe the data plane only when the log level hides the "ready" line: a probe is a connection the
        # daemon counts against this uid's max_connections_per_uid until it notices the close.
        probe = self.log_level.lower() not in ("debug", "info")
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pipellmd exited with {self.proc.returncode}:\n{self.log()}")
            if b'"event": "ready"' in self.log_path.read_bytes()[since:] or (probe and self._answers()):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"pipellmd did not become ready in {READY_TIMEOUT_S} s:\n{self.log()}")

    def _answers(self) -> bool:
        """Ready even when the log level hides the "ready" line: the data plane greets a connection."""
        data = data_socket_path(self.socket)
        if not os.path.exists(data) or not os.path.exists(self.socket):
            return False
        import socket as s

        sock = s.socket(s.AF_UNIX, s.SOCK_SEQPACKET)
        sock.settimeout(0.5)
        try:
            sock.connect(data)
            return len(sock.recv(MAX_FRAME)) > 0
        except OSError:
            return False
        finally:
            sock.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: a clean drain exits 0."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
