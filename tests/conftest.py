"""Shared fixtures: channel pairs with fresh keys, and the audit ledger behind the invariant tests."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator

import pytest
from pipellm_client import crypto
from pipellm_client.channel import KeyEpoch, RotationPolicy, Sender, StrictReceiver


def make_pair(
    key: bytes | None = None,
    mask: bytes | None = None,
    policy: RotationPolicy | None = None,
    label: str = "Lce00_h2d_user",
) -> tuple[Sender, StrictReceiver]:
    key = key if key is not None else os.urandom(32)
    mask = mask if mask is not None else os.urandom(12)
    policy = policy or RotationPolicy()
    return (
        Sender(label, KeyEpoch(label, 0, key, mask), policy),
        StrictReceiver(label, KeyEpoch(label, 0, key, mask), policy),
    )


class NonceLedger:
    """Every CPU encryption as (key tag, nonce) -> plaintext digest; a second, different message is a bug."""

    def __init__(self) -> None:
        self.seen: dict[tuple[bytes, bytes], bytes] = {}
        self.violations: list[tuple[bytes, bytes]] = []
        self.count = 0

    def __call__(self, tag: bytes, nonce: bytes, plaintext: memoryview) -> None:
        digest = hashlib.sha256(plaintext).digest()
        self.count += 1
        prev = self.seen.setdefault((tag, nonce), digest)
        if prev != digest:
            self.violations.append((tag, nonce))


@pytest.fixture
def ledger() -> Iterator[NonceLedger]:
    led = NonceLedger()
    crypto.set_auditor(led)
    try:
        yield led
    finally:
        crypto.set_auditor(None)


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[object]:
    """A real pipellmd on a private socket. Settings via `@pytest.mark.daemon_settings(mode="naive", ...)`."""
    from pipellm_daemon.launcher import DaemonProcess

    marker = request.node.get_closest_marker("daemon_settings")
    settings = dict(marker.kwargs) if marker else {}
    settings.setdefault("workers", 2)
    settings.setdefault("pool_bytes", 1 << 30)
    with DaemonProcess(**settings) as d:
        yield d


@pytest.fixture
def loop_and_pool() -> Iterator[tuple[asyncio.AbstractEventLoop, object]]:
    """An event loop and a real two-worker pool, with a nonce ledger auditing every encryption."""
    from pipellm_client import crypto

    from pipellm_daemon.workers import WorkerPool

    loop = asyncio.new_event_loop()
    pool = WorkerPool(2)
    loop.run_until_complete(pool.start())
    ledger = NonceLedger()
    crypto.set_auditor(ledger)
    yield loop, pool
    crypto.set_auditor(None)
    assert ledger.violations == []
    loop.run_until_complete(pool.close())
    loop.close()
