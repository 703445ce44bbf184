"""What a verb is (so `main.py` can list them), and the bounded wait every request runs under."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

from .. import Client


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Client, argparse.Namespace], int]


class NoAnswer(Exception):
    """The daemon accepted the connection but did not answer in time (stopped, or its loop is stuck)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise `NoAnswer` after `seconds`, whatever the call is blocked in.

    gRPC calls carry their own timeout, but the data-plane greeting the SDK waits for does not: a
    daemon that is stopped (SIGSTOP) or wedged would hang the command, and a hung probe is worse than a
    failed one. SIGALRM interrupts the blocking read (PEP 475 retries it unless the handler raises).
    """
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_sig: int, _frame: FrameType | None) -> None:
        raise NoAnswer(f"no answer within {seconds:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
