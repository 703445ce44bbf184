"""The delivery ring: hits without a round trip, records in trusted memory, a corrupt consumer loses only itself.

The ring (pipellm_client/ring.py) is control data: which slot holds which chunk. It lives in a memfd only
the daemon and the serving process map, never in the bounce arena. These tests take hits from it through a
real daemon, play the host against the arena while records are published (tampering may only kill the
channel, never change what is delivered), and corrupt the SDK's own side of the ring.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from pipellm_client import ChannelDead, Client, DaemonError, Intent, PipeLLMError, TagMismatch
from pipellm_client.ring import KIND_DATA, RingView, ring_bytes
from pipellm_client.shm import SharedMemory

from pipellm_daemon.launcher import DaemonProcess

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _wait_published(s, n: int, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    ring = s.core.ring
    deadline = time.monotonic() + timeout
    while ring.produced - ring.consumed < n:
        assert time.monotonic() < deadline, f"the daemon published {ring.produced - ring.consumed} of {n} records"
        time.sleep(0.005)


def test_header_words_are_never_seen_half_written() -> None:
    """The other process reads `produced` and `consumed` at any moment. A word rewritten with its own value
    must read as that value throughout (struct's pack_into zeroes the bytes first: its readers saw 0 now and
    then, and the SDK took a published record for one never published)."""
    shm = SharedMemory.create("ring-words", ring_bytes(8))
    ring = RingView(shm.view, 8)
    value = (1 << 40) + 1353  # bytes in every position of the word
    ring.produced = ring.consumed = value
    pid = os.fork()
    if pid == 0:  # the writer: the same values, over and over
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for _ in range(1000):
                ring.produced = value
                ring.consumed = value
        os._exit(0)
    try:
        seen = set()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            for _ in range(1000):
                seen.add(ring.produced)
                seen.add(ring.consumed)
    finally:
        os.waitpid(pid, 0)
        ring.release()
        shm.close()
    assert seen == {value}, f"torn reads: {sorted(seen)[:5]}"


def test_hits_are_taken_from_the_ring_without_a_commit(daemon: DaemonProcess) -> None:
    data = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8)
    with Client(daemon.socket) as c, c.open_session("ring-hits") as s:
        w = s.alloc_region(8 * MiB, readonly=True, data=data)
        s.declare([Intent(w, j * MiB, MiB) for j in range(8)], cyclic=True)
        dst = np.zeros(MiB, np.uint8)
        for step in range(40):
            j = step % 8
            if step % 8 == 0:
                _wait_published(s, 2)
            s.h2d(w, j * MiB, MiB, dst)
            assert (dst == data[j * MiB : (j + 1) * MiB]).all()
        st = s.status().counters
        assert st.ring_hits >= 10, st
        assert st.commits < 40 - 10, "ring hits must not be commits"
        assert s.core.ring_hits == st.ring_hits
        assert st.hits + st.skips + st.misses + st.late == 40


def test_the_ring_is_not_in_the_arena(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, c.open_session("ring-where") as s:
        ring_fd, arena_fd = s.core.ring_shm.fd, s.core.arena.fd
        assert os.fstat(ring_fd).st_ino != os.fstat(arena_fd).st_ino
        w = s.alloc_region(2 * MiB, readonly=True, data=np.ones(2 * MiB, np.uint8))
        s.declare([Intent(w, 0, MiB)])
        _wait_published(s, 1)
        rec = s.core.ring.record(s.core.ring.consumed)
        assert rec.kind == KIND_DATA and (rec.region, rec.offset, rec.length) == (w.id, 0, MiB)
        # Nothing of the record is in the arena: the slot there holds ciphertext and its tag only.
        slot = s.core.arena.view[s.core.layout.h2d_slot(rec.slot) : s.core.layout.h2d_slot(rec.slot) + MiB + 16]
        assert bytes(slot[:MiB]) != bytes(MiB)


def test_host_rewriting_the_arena_under_a_published_record_only_kills_the_channel(daemon: DaemonProcess) -> None:
    a, b = np.full(MiB, 0x11, np.uint8), np.full(MiB, 0x22, np.uint8)
    with Client(daemon.socket) as c, c.open_session("ring-tamper") as s:
        w = s.alloc_region(2 * MiB, readonly=True, data=np.concatenate([a, b]))
        s.declare([Intent(w, 0, MiB), Intent(w, MiB, MiB)])
        _wait_published(s, 2)
        ring, layout, view = s.core.ring, s.core.layout, s.core.arena.view
        r0, r1 = ring.record(ring.consumed), ring.record(ring.consumed + 1)
        x, y = layout.h2d_slot(r0.slot), layout.h2d_slot(r1.slot)
        n = MiB + 16
        saved = bytes(view[x : x + n])
        view[x : x + n] = view[y : y + n]  # the host swaps the ciphertext of chunk 1 into chunk 0's slot
        view[y : y + n] = saved
        dst = np.zeros(MiB, np.uint8)
        with pytest.raises(TagMismatch):  # as the general path raises it: no re-key is allowed here
            s.h2d(w, 0, MiB, dst)  # the record heads the ring: the SDK's fast path, no commit frame
        assert len(s.deaths) == 1 and "tag" in s.deaths[0].lower()
        assert not dst.any(), "authentic ciphertext of another chunk was delivered as this one"
        with pytest.raises(PipeLLMError):
            s.h2d(w, MiB, MiB, dst)
        deadline = time.monotonic() + 10
        while (st := s.status()).counters.channel_deaths < 1:  # the endpoint told the daemon, as a commit would
            assert time.monotonic() < deadline, "the daemon never heard that the endpoint refused a record"
            time.sleep(0.01)
        assert st.counters.commits == 0 and st.counters.ring_hits == 0


@pytest.mark.parametrize("where", ["past-producer", "backwards"])
def test_a_client_corrupting_its_consumer_index_loses_only_its_session(daemon: DaemonProcess, where: str) -> None:
    data = np.random.default_rng(2).integers(0, 256, 4 * MiB, dtype=np.uint8)
    with Client(daemon.socket) as c, c.open_session("ring-bad") as s, c.open_session("bystander") as by:
        w = s.alloc_region(4 * MiB, readonly=True, data=data)
        bw = by.alloc_region(4 * MiB, readonly=True, data=data)
        s.declare([Intent(w, j * MiB, MiB) for j in range(4)], cyclic=True)
        dst = np.zeros(MiB, np.uint8)
        _wait_published(s, 2)
        s.h2d(w, 0, MiB, dst)
        s.h2d(w, MiB, MiB, dst)
        ring = s.core.ring
        ring.consumed = ring.produced + 5 if where == "past-producer" else 0
        os.eventfd_write(s.core.bell, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.poll()
                s.h2d(w, 2 * MiB, MiB, dst)
            except PipeLLMError as exc:
                assert "consumer index" in str(exc) or isinstance(exc, ChannelDead | DaemonError), exc
                break
            assert time.monotonic() < deadline, "the corrupt consumer index went unnoticed"
            time.sleep(0.01)
        for j in range(4):  # the daemon and the other session carry on
            by.h2d(bw, j * MiB, MiB, dst)
            assert (dst == data[j * MiB : (j + 1) * MiB]).all()
        assert c.status().healthy
