"""The asyncio client: same sessions, several commits in flight, D2H serialised in encryption order.

The scenarios both clients share (recovery, landings, errors at the next call, a daemon restart) run on
both in tests/test_client_parity.py; these are the asyncio client's own: what concurrency adds."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pipellm_client import DaemonError, Intent, PipeLLMError
from pipellm_client.aio import AsyncClient

from .test_recovery import tamper_next

pytestmark = pytest.mark.integration


def test_async_round_trips_and_concurrency(daemon) -> None:
    async def run() -> None:
        async with AsyncClient(daemon.socket) as c:
            assert await c.health() == "SERVING"
            s = await c.open_session("aio")
            data = np.random.default_rng(1).integers(0, 256, 6 << 20, dtype=np.uint8)
            w = await s.alloc_region(6 << 20, readonly=True, data=data)
            kv = await s.alloc_region(6 << 20)
            await s.declare([Intent(w, j << 20, 1 << 20) for j in range(6)], cyclic=True)
            dsts = [np.zeros(1 << 20, np.uint8) for _ in range(6)]
            for _ in range(3):  # six commits in flight at once, served in order
                await asyncio.gather(*(s.h2d(w, j << 20, 1 << 20, dsts[j]) for j in range(6)))
                for j in range(6):
                    assert (dsts[j] == data[j << 20 : (j + 1) << 20]).all()
            blocks = [np.random.default_rng(10 + i).integers(0, 256, 300_000, dtype=np.uint8) for i in range(4)]
            await asyncio.gather(*(s.d2h(b, kv, i * 300_000, swap_out=True) for i, b in enumerate(blocks)))
            await s.wait_landed(kv)
            for i, b in enumerate(blocks):
                back = np.zeros(300_000, np.uint8)
                await s.h2d(kv, i * 300_000, 300_000, back)
                assert (back == b).all()
            st = await s.status()
            assert st.counters.hits >= 12 and st.counters.bytes_d2h == 1_200_000
            assert len(await c.list_sessions()) == 1
            assert (await c.status()).healthy
            await s.close()
            assert await c.list_sessions() == []

    asyncio.run(run())


def test_concurrent_calls_see_one_death_and_one_rekey(daemon) -> None:
    """Every call in flight on a channel that dies fails with it; with `recover=True` they all retry on the
    new channels, and the death is counted (and re-keyed) once, not once per call."""
    data = np.random.default_rng(2).integers(0, 256, 4 << 20, dtype=np.uint8)

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("aio-deaths", recover=True) as s:
            w = await s.alloc_region(4 << 20, readonly=True, data=data)
            dsts = [np.zeros(1 << 20, np.uint8) for _ in range(4)]
            tampered = tamper_next(s)
            await asyncio.gather(*(s.h2d(w, j << 20, 1 << 20, dsts[j]) for j in range(4)))
            assert tampered and s.rekeys == 1 and len(s.deaths) == 1
            for j in range(4):
                assert (dsts[j] == data[j << 20 : (j + 1) << 20]).all()
            st = await c.status()
            assert st.totals.channel_deaths == 1 and [x.session_id for x in st.sessions] == [s.id]

    asyncio.run(run())


@pytest.mark.daemon_settings(d2h_slots=4, chunk_size=1 << 20)
def test_concurrent_d2h_waiting_for_slots_lands_in_order(daemon) -> None:
    """Without a private queue (as with a CUDA endpoint), D2H calls wait for free slots; concurrent ones
    must still hand the daemon their messages in encryption order, or the tags would not verify."""
    blocks = [np.random.default_rng(20 + i).integers(0, 256, 3 << 20, dtype=np.uint8) for i in range(4)]

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("aio-slots") as s:
            s.core.can_queue_d2h = lambda: False  # type: ignore[method-assign]
            kv = await s.alloc_region(12 << 20)
            await asyncio.gather(*(s.d2h(b, kv, i * (3 << 20), swap_out=True) for i, b in enumerate(blocks)))
            assert not s.core.d2h_backlog
            await s.wait_landed(kv)
            for i, b in enumerate(blocks):
                assert (kv.read(i * (3 << 20), 3 << 20) == b).all()
            assert (await s.status()).counters.bytes_d2h == 12 << 20

    asyncio.run(run())


def test_region_methods_never_block_the_loop(daemon) -> None:
    """`Region.read`/`write`/`seal` cannot await: they refuse what would wait, and the session's awaitables
    (`wait_landed`, `seal`) do the waiting."""

    async def run() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("aio-regions") as s:
            kv = await s.alloc_region(1 << 20)
            src = np.random.default_rng(5).integers(0, 256, 1 << 20, dtype=np.uint8)
            landings = await s.d2h(src, kv, 0)  # no await inside: nothing has landed yet
            assert not all(x.done for x in landings)
            with pytest.raises(PipeLLMError, match="wait_landed"):
                kv.read()
            await s.wait_landed(kv, 0, 1 << 20)
            assert (kv.read() == src).all()
            ro = await s.alloc_region(4096, readonly=True)
            ro.array[:] = 9
            with pytest.raises(PipeLLMError, match=r"session\.seal"):
                ro.seal()
            await s.seal(ro)
            assert ro.sealed and not ro.array.flags.writeable
            dst = np.zeros(4096, np.uint8)
            await s.h2d(ro, 0, 4096, dst)
            assert (dst == 9).all()

    asyncio.run(run())


def test_an_unclaimed_error_is_raised_by_the_next_wait_or_poll(daemon) -> None:
    async def run() -> None:
        async with AsyncClient(daemon.socket) as c, await c.open_session("aio-unclaimed") as s:
            w = await s.alloc_region(4096, readonly=True, data=np.ones(4096, np.uint8))
            s.fs.sock.send(b"\xff\xff\xff not a frame")
            for _ in range(200):  # nobody waits: the loop reads the error frame and keeps it
                if s._unclaimed is not None:
                    break
                await asyncio.sleep(0.01)
            with pytest.raises(DaemonError, match="INVALID_ARGUMENT"):
                await s.poll()
            await s.poll()  # raised once
            dst = np.zeros(4096, np.uint8)
            await s.h2d(w, 0, 4096, dst)
            assert (dst == 1).all()

    asyncio.run(run())
