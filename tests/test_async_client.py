"""The asyncio client: same sessions, several commits in flight, D2H serialised in encryption order."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from pipellm_client import Intent
from pipellm_client.aio import AsyncClient

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
