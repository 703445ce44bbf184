"""The sync and asyncio clients are one SDK: the same public surface, and the same scenarios pass on both.

Each scenario is written once, as a coroutine that drives either client through `do(...)` (a sync call's
result, or an aio call awaited), and runs against a real pipellmd for both `Client` and `AsyncClient`.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pytest
from pipellm_client import ChannelDead, Client, DaemonError, DaemonUnavailable, Intent, PipeLLMError
from pipellm_client.aio import AsyncClient, AsyncSession
from pipellm_client.client import Session

from pipellm_daemon.launcher import DaemonProcess

from .daemon_harness import rand
from .test_recovery import tamper_next

MiB = 1 << 20
KINDS = ["sync", "aio"]


async def do(x: Any) -> Any:
    """One scenario, either client: await what the asyncio client returns, take the sync one's as it is."""
    return await x if inspect.isawaitable(x) else x


def run(kind: str, socket: str, scenario: Callable[[Any], Awaitable[None]]) -> None:
    async def main() -> None:
        c = Client(socket) if kind == "sync" else AsyncClient(socket)
        try:
            await scenario(c)
        finally:
            await do(c.close())

    asyncio.run(main())


async def eventually(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def fetch(s: Any, w: Any, j: int) -> np.ndarray:
    dst = np.zeros(MiB, np.uint8)
    await do(s.h2d(w, j * MiB, MiB, dst))
    return dst


# -- the surface ------------------------------------------------------------------------------------------
def _methods(cls: type) -> dict[str, Any]:
    return {n: m for n, m in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def _properties(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls, lambda v: isinstance(v, property)) if not n.startswith("_")}


def _params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize(
    ("sync", "aio", "expected"),
    [
        (Client, AsyncClient, {"open_session", "status", "list_sessions", "watch", "health", "call", "close"}),
        (Session, AsyncSession, {"wait_landed", "seal", "poll", "rekey", "declare", "cancel_intents", "d2h"}),
    ],
)
def test_the_clients_mirror_each_other_method_for_method(sync: type, aio: type, expected: set[str]) -> None:
    s, a = _methods(sync), _methods(aio)
    assert sorted(s) == sorted(a)
    assert _properties(sync) == _properties(aio)
    for name, fn in s.items():
        assert _params(fn) == _params(a[name]), name
        if inspect.isgeneratorfunction(fn):  # watch: an iterator, an async iterator
            assert inspect.isasyncgenfunction(a[name]), name
        else:
            assert not inspect.iscoroutinefunction(fn) and inspect.iscoroutinefunction(a[name]), name
    assert expected <= s.keys()


# -- recovery ---------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_recover_rekeys_and_retries_from_plaintext(daemon: DaemonProcess, kind: str) -> None:
    data = rand(4 * MiB, 1)

    async def scenario(c: Any) -> None:
        s = await do(c.open_session("recovering", recover=True))
        w = await do(s.alloc_region(4 * MiB, readonly=True, data=data))
        kv = await do(s.alloc_region(MiB))
        kv.write(0, data[:MiB])
        await do(s.declare([Intent(w, j * MiB, MiB) for j in range(4)], cyclic=True))
        old_id, old_key = s.id, s.endpoint.h2d[0].epoch.key_bytes()
        tampered = tamper_next(s)
        dst = await fetch(s, w, 1)  # dies under tampering, re-keys, retries
        assert tampered and (dst == data[MiB : 2 * MiB]).all()
        assert s.rekeys == 1 and len(s.deaths) == 1 and "tag mismatch" in s.deaths[0]
        assert s.id != old_id and s.endpoint.h2d[0].epoch.key_bytes() != old_key
        for j in range(4):  # the same Region objects keep working, read-only ones still sealed
            assert (await fetch(s, w, j) == data[j * MiB : (j + 1) * MiB]).all()
        assert w.sealed and not w.array.flags.writeable
        assert (await fetch(s, kv, 0) == data[:MiB]).all()
        await eventually(lambda: _deaths(c, 1))
        assert (await do(c.status())).totals.channel_deaths == 1
        await do(s.close())

    run(kind, daemon.socket, scenario)
    assert '"event": "channel_dead"' in daemon.log()


async def _deaths(c: Any, n: int) -> bool:
    return bool((await do(c.status())).totals.channel_deaths >= n)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_without_recover_the_death_is_an_error(daemon: DaemonProcess, kind: str) -> None:
    async def scenario(c: Any) -> None:
        s = await do(c.open_session("strict"))
        w = await do(s.alloc_region(MiB, readonly=True, data=np.ones(MiB, np.uint8)))
        tamper_next(s)
        dst = np.zeros(MiB, np.uint8)
        with pytest.raises(ChannelDead):
            await do(s.h2d(w, 0, MiB, dst))
        assert not dst.any() and s.rekeys == 0 and len(s.deaths) == 1
        with pytest.raises(ChannelDead):
            await do(s.h2d(w, 0, 16, dst[:16]))
        await do(s.close())

    run(kind, daemon.socket, scenario)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_max_rekeys_bounds_recovery(daemon: DaemonProcess, kind: str) -> None:
    async def scenario(c: Any) -> None:
        s = await do(c.open_session("hostile", recover=True, max_rekeys=2))
        w = await do(s.alloc_region(MiB, readonly=True, data=np.ones(MiB, np.uint8)))
        dst = np.zeros(MiB, np.uint8)
        for _ in range(3):
            tamper_next(s)
            try:
                await do(s.h2d(w, 0, MiB, dst))
            except ChannelDead:
                break
        assert s.rekeys == 2 and len(s.deaths) == 3
        await eventually(lambda: _deaths(c, 3))
        assert (await do(c.status())).totals.channel_deaths == 3
        await do(s.close())

    run(kind, daemon.socket, scenario)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_a_cancelled_cycle_is_not_declared_again_by_a_rekey(daemon: DaemonProcess, kind: str) -> None:
    async def scenario(c: Any) -> None:
        s = await do(c.open_session("cycle-rekey", recover=True))
        w = await do(s.alloc_region(4 * MiB, readonly=True, data=rand(4 * MiB, 2)))
        await do(s.declare([Intent(w, j * MiB, MiB) for j in range(4)], cyclic=True))
        await do(s.rekey())  # a re-key declares the cycle again on the new channels
        assert (await do(s.status())).intents_pending > 0
        await do(s.cancel_intents())
        await do(s.rekey())
        assert s.rekeys == 2 and (await do(s.status())).intents_pending == 0
        await do(s.close())

    run(kind, daemon.socket, scenario)


# -- the delivery ring's fast path ------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_hits_from_the_ring_send_no_frame_and_a_mismatch_falls_back(daemon: DaemonProcess, kind: str) -> None:
    """`h2d` of a chunk whose record heads the ring is served on the spot, with no commit; a chunk that is
    not at the head (here: out of the declared order) takes the general path and still arrives intact."""
    data = rand(8 * MiB, 5)

    async def scenario(c: Any) -> None:
        s = await do(c.open_session("fast-path"))
        w = await do(s.alloc_region(8 * MiB, readonly=True, data=data))
        await do(s.declare([Intent(w, j * MiB, MiB) for j in range(8)]))
        ring = s.core.ring
        await eventually(lambda: _published(ring, 2))
        for j in (0, 1):
            assert (await fetch(s, w, j) == data[j * MiB : (j + 1) * MiB]).all()
        assert s.core.ring_hits == 2 and not s.core.pending
        assert (await fetch(s, w, 5) == data[5 * MiB : 6 * MiB]).all()  # a skip: the daemon decides
        st = (await do(s.status())).counters
        assert (st.ring_hits, st.commits) == (2, 1), st
        await do(s.close())

    run(kind, daemon.socket, scenario)


async def _published(ring: Any, n: int) -> bool:
    return bool(ring.produced - ring.consumed >= n)


# -- landings -----------------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_wait_landed_then_read_and_swap_in(daemon: DaemonProcess, kind: str) -> None:
    sizes = [1, 4095, 65_537, 300_000, MiB + 1]
    total = sum(sizes)

    async def scenario(c: Any) -> None:
        s = await do(c.open_session("landings"))
        kv = await do(s.alloc_region(total + 4096, name="kv"))
        srcs, off = [], 0
        for i, n in enumerate(sizes):
            srcs.append((off, rand(n, 10 + i)))
            landings = await do(s.d2h(srcs[-1][1], kv, off, swap_out=True))
            assert landings and all(x.region is kv for x in landings)
            off += n
        first_off, first = srcs[1]
        await do(s.wait_landed(kv, first_off, len(first)))  # one range: its landings are in
        assert (kv.read(first_off, len(first)) == first).all()
        await do(s.wait_landed(kv))  # the whole region
        for o, src in srcs:
            assert (kv.read(o, len(src)) == src).all()
            back = np.zeros(len(src), np.uint8)
            await do(s.h2d(kv, o, len(src), back))
            assert (back == src).all()
        landed = await do(s.d2h(rand(4096, 99), kv, total, wait=True))
        assert all(x.done and x.error is None for x in landed)
        assert (await do(s.status())).counters.bytes_d2h == total + 4096
        await do(s.close())

    run(kind, daemon.socket, scenario)


# -- errors at the next call ----------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_a_refused_declare_is_raised_at_the_next_call(daemon: DaemonProcess, kind: str) -> None:
    async def scenario(c: Any) -> None:
        s = await do(c.open_session("refused"))
        w = await do(s.alloc_region(2 * MiB, readonly=True, data=np.ones(2 * MiB, np.uint8)))
        assert await do(s.declare([Intent(w, MiB, 4 * MiB)])) == 1  # outside the region: the call does not wait
        await fetch(s, w, 0)  # the refusal arrives while this commit runs
        with pytest.raises(DaemonError) as ei:
            await fetch(s, w, 0)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and "intent 0" in ei.value.details
        assert (await fetch(s, w, 1) == 1).all()  # raised once; the session goes on
        await do(s.declare([Intent(w, 0, 3 * MiB)]))
        await fetch(s, w, 0)
        with pytest.raises(DaemonError, match="intent 0"):  # cancel_intents is a next call too
            await do(s.cancel_intents())
        await do(s.cancel_intents())
        assert (await do(s.status())).intents_pending == 0
        await do(s.close())

    run(kind, daemon.socket, scenario)


@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_an_error_for_no_request_is_raised_once(daemon: DaemonProcess, kind: str) -> None:
    async def scenario(c: Any) -> None:
        s = await do(c.open_session("unsolicited"))
        w = await do(s.alloc_region(MiB, readonly=True, data=np.full(MiB, 7, np.uint8)))
        s.fs.sock.send(b"\xff\xff\xff not a frame")  # the daemon answers with an error frame of seq 0
        with pytest.raises(DaemonError) as ei:
            await fetch(s, w, 0)
        assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (await fetch(s, w, 0) == 7).all()
        await do(s.poll())
        await do(s.close())

    run(kind, daemon.socket, scenario)


# -- a daemon restart ----------------------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("kind", KINDS)
def test_an_old_client_greets_a_restarted_daemon_again(kind: str) -> None:
    """The control connection's ticket dies with the daemon: the client greets the new one by itself; its
    old sessions fail clearly (sessions never outlive a daemon, `recover` or not)."""
    directory = tempfile.mkdtemp(prefix="pl-parity-")  # a short path: Unix socket names are limited
    d1 = DaemonProcess(directory=directory, workers=1, pool_bytes=1 << 30).start()
    d2: DaemonProcess | None = None

    async def scenario(c: Any) -> None:
        nonlocal d2
        assert (await do(c.status())).healthy
        old = await do(c.open_session("before", recover=True))
        w = await do(old.alloc_region(MiB, readonly=True, data=np.ones(MiB, np.uint8)))
        d1.kill()
        d2 = DaemonProcess(directory=directory, workers=1, pool_bytes=1 << 30).start()
        deadline = time.monotonic() + 20
        while True:  # the first calls may report the loss; then the same client works again
            try:
                st = await do(c.status())
                break
            except DaemonUnavailable:
                assert time.monotonic() < deadline, "the old client never reconnected"
                await asyncio.sleep(0.1)
        assert st.healthy and [x.client_name for x in st.sessions] == []
        untouched = np.zeros(16, np.uint8)
        with pytest.raises((DaemonUnavailable, ChannelDead, PipeLLMError)):
            await do(old.h2d(w, 0, 16, untouched))
        assert not untouched.any() and old.rekeys == 0
        await do(old.close())
        s = await do(c.open_session("after"))
        assert (await do(s.status())).counters.commits == 0
        w2 = await do(s.alloc_region(MiB, readonly=True, data=np.full(MiB, 3, np.uint8)))
        assert (await fetch(s, w2, 0) == 3).all()
        await do(s.close())
        assert await do(c.list_sessions()) == []

    try:
        run(kind, d1.socket, scenario)
    finally:
        d1.kill()
        if d2 is not None:
            d2.stop()
        shutil.rmtree(directory, ignore_errors=True)
