"""Intents travel on the data plane, fire-and-forget: in order with commits, refusals raised at a later call."""

from __future__ import annotations

import asyncio
import struct
import time

import grpc
import numpy as np
import psutil
import pytest
from pipellm_client import Client, DaemonError, Intent, InvalidArgument
from pipellm_client._core import DECLARE_RECORDS_PER_FRAME
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.aio import AsyncClient
from pipellm_client.endpoint import SpareBuffers

from pipellm_daemon.launcher import DaemonProcess

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _fetch(s, w, j: int) -> np.ndarray:
    dst = np.zeros(MiB, np.uint8)
    s.h2d(w, j * MiB, MiB, dst)
    return dst


def test_declared_intents_are_hits_and_cancel_works(daemon: DaemonProcess) -> None:
    data = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8)
    with Client(daemon.socket) as c, c.open_session("dp-intents") as s:
        w = s.alloc_region(8 * MiB, readonly=True, data=data)
        assert s.declare([Intent(w, j * MiB, MiB) for j in (5, 1, 6)]) == 3
        for j in (5, 1, 6):
            assert (_fetch(s, w, j) == data[j * MiB : (j + 1) * MiB]).all()
        st = s.status()
        assert st.counters.hits == 3 and st.counters.misses == 0
        s.declare([Intent(w, j * MiB, MiB) for j in (2, 3)], cyclic=True)
        s.cancel_intents()
        assert (_fetch(s, w, 0) == data[:MiB]).all()
        assert s.status().intents_pending == 0


def test_a_refused_declare_is_raised_at_the_next_call(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, c.open_session("dp-refused") as s:
        w = s.alloc_region(2 * MiB, readonly=True, data=np.ones(2 * MiB, np.uint8))
        s.declare([Intent(w, MiB, 4 * MiB)])  # outside the region: the call itself does not wait
        _fetch(s, w, 0)  # the refusal arrives while this commit runs
        with pytest.raises(DaemonError) as ei:
            _fetch(s, w, 0)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "intent 0" in ei.value.details
        assert (_fetch(s, w, 1) == 1).all()  # raised once; the session goes on


def test_a_declaration_larger_than_a_frame_is_applied_whole(daemon: DaemonProcess) -> None:
    n = DECLARE_RECORDS_PER_FRAME + 300
    with Client(daemon.socket) as c, c.open_session("dp-many") as s:
        w = s.alloc_region(4 * MiB, readonly=True, data=np.full(4 * MiB, 9, np.uint8))
        s.declare([Intent(w, (j % 4) * MiB, MiB) for j in range(n)])
        assert (_fetch(s, w, 0) == 9).all()
        assert s.status().intents_pending == n - 1


def test_bad_declare_records_are_refused_precisely(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, c.open_session("dp-bad") as s:
        w = s.alloc_region(MiB, readonly=True, data=np.ones(MiB, np.uint8))
        for bad, why in [
            (pb.Declare(seq=900, records=b"\0" * 31), "32 bytes each"),
            (pb.Declare(seq=901, records=struct.pack("<4Q", w.id, 0, MiB, 6)), "unknown flags"),
            (pb.Declare(seq=902, records=struct.pack("<4Q", 12345, 0, MiB, 0)), "region 12345"),
            (pb.Declare(seq=903, cancel=True, records=struct.pack("<4Q", w.id, 0, MiB, 0)), "no records"),
        ]:
            s.fs.send(pb.Frame(declare=bad))
            _fetch(s, w, 0)
            with pytest.raises(DaemonError, match=why):
                _fetch(s, w, 0)


def test_async_client_declares_on_the_data_plane(daemon: DaemonProcess) -> None:
    data = np.random.default_rng(2).integers(0, 256, 4 * MiB, dtype=np.uint8)

    async def main() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("dp-aio") as s:
            w = await s.alloc_region(4 * MiB, readonly=True, data=data)
            assert await s.declare([Intent(w, j * MiB, MiB) for j in (3, 0)]) == 2
            for j in (3, 0):
                dst = np.zeros(MiB, np.uint8)
                await s.h2d(w, j * MiB, MiB, dst)
                assert (dst == data[j * MiB : (j + 1) * MiB]).all()
            assert (await s.status()).counters.hits == 2

    asyncio.run(main())


# -- D2H that does not wait for bounce slots --------------------------------------------------------------
@pytest.mark.daemon_settings(d2h_slots=4, chunk_size=MiB)
def test_d2h_returns_before_slots_free_and_everything_lands(daemon: DaemonProcess) -> None:
    n = 24 * MiB
    src = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
    with Client(daemon.socket) as c, c.open_session("d2h-queue") as s:
        kv = s.alloc_region(n)
        landings = s.d2h(src, kv, 0, swap_out=True)  # 24 messages, 4 slots: most wait in the queue
        assert s.core.d2h_backlog, "d2h returned only after every message had a slot"
        assert not all(x.done for x in landings)
        back = np.zeros(n, np.uint8)
        s.h2d(kv, 0, n, back)  # the swap-in waits for every landing, queued ones included
        assert (back == src).all() and (kv.read() == src).all()
        assert not s.core.d2h_backlog and s.core.d2h_backlog_bytes == 0
        assert all(x.done and x.error is None for x in landings)
        assert s.status().counters.bytes_d2h == n


@pytest.mark.daemon_settings(d2h_slots=4, chunk_size=MiB)
def test_a_sync_loop_that_only_swaps_out_drains_its_queue_at_the_next_d2h(daemon: DaemonProcess) -> None:
    """A serving loop that issues nothing but D2H never waits on the data plane; the LandedDone frames that
    free slots must still be read (at its next d2h), or every later chunk queues in private memory."""
    blocks = 40
    src = np.random.default_rng(5).integers(0, 256, blocks * MiB, dtype=np.uint8)
    with Client(daemon.socket) as c, c.open_session("d2h-drain") as s:
        kv = s.alloc_region(blocks * MiB)
        s.d2h(src[: 12 * MiB], kv, 0, swap_out=True)  # 12 messages, 4 slots: 8 wait in the queue
        assert len(s.core.d2h_backlog) == 8
        sent = 12
        while s.core.d2h_backlog and sent < blocks:
            time.sleep(0.05)  # the daemon lands what has slots and frees them
            s.d2h(src[sent * MiB : (sent + 1) * MiB], kv, sent * MiB, swap_out=True)
            sent += 1
        assert not s.core.d2h_backlog, f"the queue never drained in {sent - 12} d2h calls"
        s.wait_all()
        assert (kv.read()[: sent * MiB] == src[: sent * MiB]).all()


def test_backlog_buffers_are_reused_up_to_their_limit() -> None:
    """A fresh chunk-sized bytearray costs page faults and zeroing; drained backlog buffers come back."""
    spare = SpareBuffers(limit=3 * MiB)
    a, b = spare.take(MiB + 16), spare.take(MiB + 16)
    assert a is not b and len(a) == len(b) == MiB + 16
    spare.give(a)
    spare.give(b)
    assert {id(spare.take(MiB + 16)), id(spare.take(MiB + 16))} == {id(a), id(b)}
    assert len(spare.take(4096)) == 4096  # another size: a new buffer
    for buf in [bytearray(MiB) for _ in range(4)]:
        spare.give(buf)  # only three fit under the limit
    kept = [spare.take(MiB) for _ in range(4)]
    assert len({id(x) for x in kept}) == 4 and sum(x is y for x in kept[:3] for y in kept[3:]) == 0


@pytest.mark.daemon_settings(d2h_slots=4, chunk_size=MiB)
def test_async_d2h_queue_drains_on_its_own(daemon: DaemonProcess) -> None:
    n = 16 * MiB
    src = np.random.default_rng(4).integers(0, 256, n, dtype=np.uint8)

    async def main() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("d2h-queue-aio") as s:
            kv = await s.alloc_region(n)
            await s.d2h(src, kv, 0)
            assert s.core.d2h_backlog
            for _ in range(2000):  # the event loop moves queued ciphertext into freed slots by itself
                if not s.core.landing:
                    break
                await asyncio.sleep(0.005)
            assert not s.core.landing and not s.core.d2h_backlog
            assert (kv.read() == src).all()

    asyncio.run(main())


def test_prefault_makes_a_mutable_region_resident_and_refuses_a_read_only_one(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c, c.open_session("prefault") as s:
        kv = s.alloc_region(64 * MiB)
        before = psutil.Process().memory_info().rss
        kv.prefault()
        assert psutil.Process().memory_info().rss - before >= 60 * MiB, "the pages were not made resident"
        ro = s.alloc_region(MiB, readonly=True, data=bytes(MiB))
        with pytest.raises(InvalidArgument, match="read-only"):
            ro.prefault()
