"""After a dead channel, a session that allows it re-keys and retries from plaintext; every death stays
visible (the error or counter, the daemon's log line and metrics), so tampering is never silently absorbed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pipellm_client import ChannelDead, Client, Intent

pytestmark = pytest.mark.integration


def tamper_next(s, times: int = 1) -> list[int]:
    """The untrusted host flips a ciphertext bit in the next `times` DATA messages."""
    hits: list[int] = []
    real = s.core.apply_completion

    def apply(comp):
        for d in comp.deliveries:
            if d.kind == 1 and len(hits) < times:
                s.core.arena.view[s.core.layout.h2d_slot(d.slot) + 3] ^= 0x01
                hits.append(d.slot)
        return real(comp)

    s.core.apply_completion = apply
    return hits


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_rekey_and_retry_from_plaintext(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("recovering", recover=True) as s:
        data = np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8)
        w = s.alloc_region(4 << 20, readonly=True, data=data)
        kv = s.alloc_region(1 << 20)
        kv.write(0, data[: 1 << 20])
        s.declare([Intent(w, j << 20, 1 << 20) for j in range(4)], cyclic=True)
        old_id, old_key = s.id, s.core.endpoint.h2d[0].epoch.key_bytes()
        tampered = tamper_next(s)
        dst = np.zeros(1 << 20, np.uint8)
        s.h2d(w, 1 << 20, 1 << 20, dst)  # dies under tampering, re-keys, retries
        assert tampered and (dst == data[1 << 20 : 2 << 20]).all()
        assert s.rekeys == 1 and len(s.deaths) == 1 and "tag mismatch" in s.deaths[0]
        assert s.id != old_id and s.core.endpoint.h2d[0].epoch.key_bytes() != old_key
        for j in range(4):  # the same Region objects keep working, read-only ones still sealed
            s.h2d(w, j << 20, 1 << 20, dst)
            assert (dst == data[j << 20 : (j + 1) << 20]).all()
        assert w.sealed and not w.array.flags.writeable
        back = np.zeros(1 << 20, np.uint8)
        s.h2d(kv, 0, 1 << 20, back)
        assert (back == data[: 1 << 20]).all()
        wait_for(lambda: c.status().totals.channel_deaths >= 1)
        assert c.status().totals.channel_deaths == 1
    assert '"event": "channel_dead"' in daemon.log()


def test_without_recovery_the_death_is_an_error(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("strict") as s:
        w = s.alloc_region(1 << 20, readonly=True, data=np.ones(1 << 20, np.uint8))
        tamper_next(s)
        dst = np.zeros(1 << 20, np.uint8)
        with pytest.raises(ChannelDead):
            s.h2d(w, 0, 1 << 20, dst)
        assert (dst == 0).all() and s.rekeys == 0
        with pytest.raises(ChannelDead):
            s.h2d(w, 0, 16, dst[:16])


def test_persistent_tampering_exhausts_the_rekey_budget(daemon) -> None:
    with Client(daemon.socket) as c, c.open_session("hostile", recover=True, max_rekeys=2) as s:
        w = s.alloc_region(1 << 20, readonly=True, data=np.ones(1 << 20, np.uint8))
        dst = np.zeros(1 << 20, np.uint8)
        for _ in range(3):
            tamper_next(s)
            try:
                s.h2d(w, 0, 1 << 20, dst)
            except ChannelDead:
                break
        assert s.rekeys == 2 and len(s.deaths) == 3
        wait_for(lambda: c.status().totals.channel_deaths >= 3)
        assert c.status().totals.channel_deaths == 3
