"""Helpers for the tests that run against a real pipellmd process: seeded data and checked round trips,
polling, background transfer loops, the crypto worker processes, and a bystander session that must never
notice what happens to the others."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import psutil
from pipellm_client import Client

from pipellm_daemon.launcher import DaemonProcess

if TYPE_CHECKING:
    from pipellm_client.client import Session
    from pipellm_client.regions import Region

Bytes = np.ndarray[Any, np.dtype[np.uint8]]

CH = 64 << 10  # a small chunk: many messages per transfer, cheap sessions
SMALL_DAEMON: Final[dict[str, Any]] = {"workers": 2, "chunk_size": CH, "pool_bytes": 256 << 20}
"""The daemon most attack, fuzz and fault tests run: two workers, small chunks, a small pool; each adds the
slot counts and thresholds its attacks need."""


def rand(n: int, seed: int) -> Bytes:
    """`n` seeded random bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def checked_weights(s: Session, n: int, seed: int, *, loads: int = 1, name: str = "w") -> tuple[Region, Bytes]:
    """A sealed region of `n` random bytes, loaded whole `loads` times (the cycle predictor learns it) and
    checked; returns it and its data."""
    data = rand(n, seed)
    w = s.alloc_region(n, readonly=True, name=name, data=data)
    dst = np.zeros(n, np.uint8)
    for _ in range(loads):
        s.h2d(w, 0, n, dst)
    assert (dst == data).all()
    return w, data


def checked_swap(s: Session, kv: Region, offset: int, n: int) -> None:
    """`n` bytes swapped out into `kv` at `offset` and back in, checked."""
    src = np.arange(n, dtype=np.uint8)
    s.d2h(src, kv, offset, swap_out=True, wait=True)
    back = np.zeros(n, np.uint8)
    s.h2d(kv, offset, n, back)
    assert (back == src).all()


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll a condition (generous timeout: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def worker_procs(daemon_pid: int) -> list[psutil.Process]:
    """The daemon's crypto worker processes, in the order psutil lists them."""
    procs = []
    for p in psutil.Process(daemon_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "pipellm_daemon.worker" in " ".join(p.cmdline()):
                procs.append(p)
    return procs


class Background:
    """Runs rounds `step(0)`, `step(1)`, ... in a daemon thread until the block ends (a transfer loop that
    a test kills things under).

    `step` returns whether its round's bytes were right; `rounds` counts the right ones. A wrong round ends
    the loop and its index is kept in `wrong`, as the exception that ended it is in `exc` (one raised in a
    thread would only be printed): the test asserts on both after the block.
    """

    def __init__(self, step: Callable[[int], bool]) -> None:
        self.step = step
        self.rounds = 0
        self.wrong: int | None = None
        self.exc: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step(self.rounds):
                    self.wrong = self.rounds
                    return
                self.rounds += 1
        except BaseException as exc:
            self.exc = exc

    def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """`wait_for(pred)`, cut short by the loop ending badly (the caller asserts on `exc` and `wrong`)."""
        wait_for(lambda: pred() or self.exc is not None or self.wrong is not None, what, timeout)

    def start(self) -> Background:
        self.thread.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def __enter__(self) -> Background:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _rand(n: int, seed: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


class Bystander:
    """Another client's session on the same daemon: it must keep working whatever happens to the others.

    A round is an H2D of a read-only region and a D2H swap-out and H2D swap-in through a mutable one,
    every byte checked. `check()` runs one from the test's thread; `start()` keeps running them in the
    background until `close()`.
    """

    def __init__(self, socket: str, chunk: int) -> None:
        self.client = Client(socket)
        self.session = self.client.open_session("bystander")
        self.chunk = chunk
        self.data = _rand(4 * chunk, 4242)
        self.w = self.session.alloc_region(len(self.data), readonly=True, data=self.data)
        self.kv = self.session.alloc_region(chunk)
        self.rounds = 0
        self.background: Background | None = None

    def round(self) -> bool:
        s, n, ch = self.session, len(self.data), self.chunk
        dst = np.zeros(n, np.uint8)
        s.h2d(self.w, 0, n, dst)
        assert (dst == self.data).all(), "bystander got wrong bytes"
        block = _rand(ch, 10_000 + self.rounds)
        s.d2h(block, self.kv, 0, wait=True)
        back = np.zeros(ch, np.uint8)
        s.h2d(self.kv, 0, ch, back)
        assert (back == block).all(), "bystander swap-in got wrong bytes"
        self.rounds += 1
        return True

    def check(self) -> None:
        self.round()
        assert self.session.status().counters.channel_deaths == 0

    def start(self) -> None:
        self.background = Background(lambda _i: self.round()).start()

    def wait_rounds(self, more: int, timeout: float = 30.0) -> None:
        """Wait for `more` background rounds: the bystander is still making progress."""
        assert self.background is not None, "the bystander is not running in the background"
        mark = self.rounds
        self.background.wait_for(lambda: self.rounds >= mark + more, "the bystander to make progress", timeout)
        assert self.background.exc is None, f"the bystander failed: {self.background.exc!r}"

    def close(self) -> None:
        if self.background is not None:
            self.background.stop(30)
            assert not self.background.thread.is_alive()
            assert self.background.exc is None, f"the bystander failed: {self.background.exc!r}"
        assert self.session.status().counters.channel_deaths == 0
        self.session.close()
        self.client.close()


DaemonEnv = tuple[DaemonProcess, Client, Bystander]


@contextlib.contextmanager
def daemon_with_bystander(settings: dict[str, Any], *, background: bool = False) -> Iterator[DaemonEnv]:
    """A daemon run with `settings`, a client for the test and a bystander (doing rounds all the time if
    `background`); on the way out the bystander must be unharmed and the daemon must have logged no
    internal error (an exception nobody mapped to a status)."""
    with DaemonProcess(**settings) as d:
        c = Client(d.socket)
        b = Bystander(d.socket, settings["chunk_size"])
        if background:
            b.start()
        try:
            yield d, c, b
        finally:
            b.close()
            c.close()
        assert '"event": "internal_error"' not in d.log()
