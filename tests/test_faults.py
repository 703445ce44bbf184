"""Faults with real processes: a hostile host, dying clients, daemons and workers, and an exhausted pool.

The bounce arena is untrusted memory. These tests play the host: they rewrite ciphertext in it between
the daemon (or the endpoint) writing it and the other side consuming it, and check that every attack is
detected, that nothing unauthenticated is accepted, that the death is visible (error, counter, log line),
and that other sessions do not notice. The rest kill things: a client, the daemon, a crypto worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
from pipellm_client import ChannelDead, Client, DaemonError, DaemonUnavailable, PipeLLMError, TagMismatch
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.arena import ArenaLayout
from pipellm_client.client import Session

from pipellm_daemon.launcher import DaemonProcess

from .daemon_harness import (
    CH,
    SMALL_DAEMON,
    Background,
    Bystander,
    DaemonEnv,
    checked_weights,
    daemon_with_bystander,
    rand,
    wait_for,
    worker_procs,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ATTEMPTS = 100  # per H2D attack, each in a fresh session
D2H_ATTEMPTS = 50  # per D2H attack
SENTINEL = 0xA5  # what a destination holds before a transfer: "untouched"
ATTACK_SETTINGS: dict[str, Any] = {
    **SMALL_DAEMON,
    "h2d_slots": 16,
    "d2h_slots": 6,
    "demand_slots": 4,
    "small_transfer_threshold": 3 * CH,  # transfers under 3 chunks go to copy engine 1
}
DATA = pb.MSG_KIND_DATA
ATTACKS = ["tamper", "replay", "reorder", "drop"]
DEFAULT_H2D_SLOTS = 32  # the conftest daemon runs the default


# -- helpers -----------------------------------------------------------------------------------------


def log_events(d: DaemonProcess, kind: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log().splitlines():
        if f'"event": "{kind}"' not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def is_detection(exc: BaseException) -> bool:
    """What the SDK may raise when the endpoint (or the daemon) refuses a message."""
    if isinstance(exc, ChannelDead | TagMismatch):
        return True
    return isinstance(exc, DaemonError) and exc.code == grpc.StatusCode.DATA_LOSS


def start_again(directory: str, **settings: Any) -> DaemonProcess:
    """A second daemon on the same socket and log. `DaemonProcess.start` looks for a "ready" line anywhere
    in the log, so it sees the first daemon's line and returns early; wait for this process's own."""
    d = DaemonProcess(directory=directory, **settings).start()
    wait_for(lambda: any(e.get("pid") == d.pid for e in log_events(d, "ready")), "the restarted daemon's ready line")
    return d


AttackEnv = DaemonEnv


@pytest.fixture(scope="module")
def attack_env() -> Iterator[AttackEnv]:
    with daemon_with_bystander(ATTACK_SETTINGS) as env:
        yield env


# -- H2D attacks on the bounce arena ------------------------------------------------------------------
@dataclass
class H2DAttack:
    """Plays the host against one session: records ciphertext, then attacks one commit's messages.

    Message indices count the DATA messages of the attacked commit (all on one copy engine). After the
    attack, `fail_at` is the first message the endpoint must refuse (None: the next commit's first one)
    and `dropped` the message the endpoint never saw.
    """

    kind: str
    rng: np.random.Generator
    session: Session
    armed: bool = False
    fired: bool = False
    seen: int = 0
    target: int = 0
    total: int = 0
    fail_at: int | None = None
    dropped: int | None = None
    ce: int = -1
    held: pb.Completion | None = None
    recorded: dict[int, list[bytes]] = field(default_factory=dict)  # message length -> ciphertexts

    def install(self) -> None:
        core = self.session.core
        real = core.apply_completion

        def hooked(comp: pb.Completion) -> pb.Frame | None:
            if self.armed and not self.fired:
                attacked = self._attack(comp)
                if attacked is None:
                    return None  # held back: the endpoint sees it with the next completion
                comp = attacked
            elif not self.armed:
                for d in comp.deliveries:
                    if d.kind == DATA:
                        self.recorded.setdefault(d.length, []).append(bytes(self._slot(d.slot, d.length)))
            return real(comp)

        core.apply_completion = hooked  # type: ignore[method-assign]

    def _slot(self, slot: int, length: int) -> memoryview:
        core = self.session.core
        assert core.arena is not None
        off = core.layout.h2d_slot(slot)
        return core.arena.view[off : off + length + 16]

    def _attack(self, comp: pb.Completion) -> pb.Completion | None:
        if self.kind == "reorder" and self.held is not None:
            # The host delayed the earlier messages (it controls when the copy engine sees them).
            comp = pb.Completion(seq=comp.seq, deliveries=[*self.held.deliveries, *comp.deliveries], final=comp.final)
            self.held = None
        data = [i for i, d in enumerate(comp.deliveries) if d.kind == DATA]
        if self.kind == "reorder" and len(data) < 2:
            if not comp.final:
                self.held = comp
                return None
            self.seen += len(data)
            return comp
        first = self.seen
        self.seen += len(data)
        if self.kind == "reorder":
            a, b = sorted(self.rng.choice(len(data), 2, replace=False).tolist())
            da, db = comp.deliveries[data[a]], comp.deliveries[data[b]]
            n = max(da.length, db.length) + 16
            va, vb = self._slot(da.slot, n - 16), self._slot(db.slot, n - 16)
            saved = bytes(va)
            va[:] = vb
            vb[:] = saved
            self.fail_at, self.ce, self.fired = first + a, da.ce, True
            return comp
        if not first <= self.target < self.seen:
            return comp
        idx = data[self.target - first]
        d = comp.deliveries[idx]
        self.ce, self.fired = d.ce, True
        if self.kind == "tamper":
            view = self._slot(d.slot, d.length)
            pos = int(self.rng.integers(0, len(view)))  # anywhere: ciphertext or tag
            view[pos] ^= int(self.rng.integers(1, 256))
            self.fail_at = self.target
        elif self.kind == "replay":
            same = self.recorded.get(d.length) or [c for cs in self.recorded.values() for c in cs]
            old = same[int(self.rng.integers(0, len(same)))]
            view = self._slot(d.slot, d.length)
            view[: min(len(old), len(view))] = old[: len(view)]
            self.fail_at = self.target
        elif self.kind == "drop":
            kept = [x for i, x in enumerate(comp.deliveries) if i != idx]
            comp = pb.Completion(seq=comp.seq, deliveries=kept, final=comp.final)
            self.dropped = self.target
            # The endpoint's counter is now one behind: the next DATA message on that engine fails, in
            # this commit if there is one, else in the next commit.
            self.fail_at = self.target + 1 if self.target + 1 < self.total else None
        else:
            raise AssertionError(self.kind)
        return comp


def check_destination(
    dst: np.ndarray, expected: np.ndarray, nmsg: int, fail_at: int | None, dropped: int | None
) -> None:
    """Messages before the failure hold verified plaintext; the refused one is wiped; the rest untouched."""
    for i in range(nmsg):
        got, want = dst[i * CH : (i + 1) * CH], expected[i * CH : (i + 1) * CH]
        if i == dropped:
            assert (got == SENTINEL).all(), f"dropped message {i} left bytes in the destination"
        elif fail_at is None or i < fail_at:
            assert (got == want).all(), f"message {i} before the failure is wrong"
        elif i == fail_at:
            assert not got.any(), f"refused message {i} left bytes in the destination"
        else:
            assert (got == SENTINEL).all(), f"message {i} after the failure was written"


def run_h2d_attack(env: AttackEnv, kind: str, attempt: int) -> dict[str, Any]:
    d, c, bystander = env
    rng = np.random.default_rng([ATTACKS.index(kind), attempt])
    nmsg = int(rng.integers(2, 7))
    length = (nmsg - 1) * CH + int(rng.integers(CH // 2, CH + 1))
    data = rand(length, attempt + 17)
    s = c.open_session(f"{kind}-{attempt}")
    try:
        w = s.alloc_region(length, readonly=True, data=data)
        attack = H2DAttack(kind, rng, s, target=int(rng.integers(0, nmsg)), total=nmsg)
        attack.install()
        warm = np.zeros(length, np.uint8)
        s.h2d(w, 0, length, warm)  # a clean commit first: replay material, and a learned cycle
        assert (warm == data).all()
        attack.armed = True
        raised: BaseException | None = None
        for _round in range(3):  # a reorder needs two messages in one completion; it gets three tries
            attack.seen = 0
            dst = np.full(length, SENTINEL, np.uint8)
            try:
                s.h2d(w, 0, length, dst)
            except Exception as exc:
                raised = exc
            if attack.fired:
                break
            assert raised is None, f"clean commit failed: {raised!r}"
            assert (dst == data).all()
        assert attack.fired, f"{kind}: no opportunity to attack in 3 commits"
        if raised is None:
            # Only a drop of a commit's last message goes unnoticed until the next message on that engine.
            assert kind == "drop" and attack.fail_at is None, f"{kind} was not detected"
            check_destination(dst, data, nmsg, None, attack.dropped)
            nxt = np.full(length, SENTINEL, np.uint8)
            with pytest.raises(Exception) as info:
                s.h2d(w, 0, length, nxt)
            raised = info.value
            check_destination(nxt, data, nmsg, 0, None)
        else:
            check_destination(dst, data, nmsg, attack.fail_at, attack.dropped)
        assert is_detection(raised), f"{kind}: unexpected error {raised!r}"
        assert s.core.dead is not None
        # The session is dead for good: later calls fail at once, in both directions.
        with pytest.raises(ChannelDead):
            s.h2d(w, 0, 16, np.zeros(16, np.uint8))
        # The daemon saw the endpoint's report: counter, dead channels, log line.
        wait_for(lambda: s.status().counters.channel_deaths == 1, f"{kind}: channel_deaths in status")
        st = s.status()
        assert all(ch.dead for ch in st.channels), "every channel of the session is dead"
        wait_for(
            lambda: any(e.get("session") == s.id for e in log_events(d, "channel_dead")),
            f"{kind}: channel_dead in the daemon log",
        )
        return {"ce": attack.ce, "late": attack.fail_at is None, "error": type(raised).__name__}
    finally:
        s.close()
        bystander.check()


@pytest.mark.parametrize("kind", ATTACKS)
def test_h2d_bounce_attacks_are_always_detected(attack_env: AttackEnv, kind: str) -> None:
    d, c, _b = attack_env
    before = c.status().totals.channel_deaths
    deaths_logged = len(log_events(d, "channel_dead"))
    results = [run_h2d_attack(attack_env, kind, i) for i in range(ATTEMPTS)]
    detected = len(results)  # every attempt above asserted detection; count them for the record
    assert detected == ATTEMPTS
    assert {r["ce"] for r in results} == {0, 1}, "both copy engines were attacked"
    if kind == "drop":  # both cases: the next message in the same commit, and in the next commit
        assert {r["late"] for r in results} == {False, True}
    wait_for(lambda: not [x for x in c.list_sessions() if x.client_name.startswith(kind)], "attacked sessions gone")
    assert c.status().totals.channel_deaths - before == ATTEMPTS
    assert len(log_events(d, "channel_dead")) - deaths_logged == ATTEMPTS
    print(f"{kind}: {detected}/{ATTEMPTS} detected; errors {sorted({r['error'] for r in results})}")


# -- D2H attacks -----------------------------------------------------------------------------------------
def run_d2h_attack(env: AttackEnv, kind: str, attempt: int) -> None:
    d, c, bystander = env
    rng = np.random.default_rng(77 + attempt)
    nmsg = int(rng.integers(2, 6))
    length = nmsg * CH
    s = c.open_session(f"d2h-{kind}-{attempt}")
    try:
        kv = s.alloc_region(length)
        clean = rand(length, attempt)
        s.d2h(clean, kv, 0, wait=True)  # a clean landing first
        assert (kv.read(0, length) == clean).all()
        core = s.core
        real = core.landed_frames
        touched: list[int] = []

        def hooked(*args: Any, **kw: Any) -> Iterator[tuple[pb.Frame, Any]]:
            for frame, landing in real(*args, **kw):
                msgs = frame.landed.messages
                assert core.arena is not None
                if not touched and len(msgs) >= (2 if kind == "reorder" else 1):
                    view = core.arena.view
                    if kind == "tamper":
                        i = int(rng.integers(0, len(msgs)))
                        m = msgs[i]
                        pos = core.layout.d2h_slot(m.slot) + int(rng.integers(0, m.length + 16))
                        view[pos] ^= int(rng.integers(1, 256))
                        touched.append(i)
                    else:
                        i, j = sorted(rng.choice(len(msgs), 2, replace=False).tolist())
                        a, b = core.layout.d2h_slot(msgs[i].slot), core.layout.d2h_slot(msgs[j].slot)
                        n = CH + 16
                        saved = bytes(view[a : a + n])
                        view[a : a + n] = view[b : b + n]
                        view[b : b + n] = saved
                        touched.extend([i, j])
                yield frame, landing

        core.landed_frames = hooked  # type: ignore[method-assign]
        fresh = rand(length, 500 + attempt)
        with pytest.raises(DaemonError) as info:
            s.d2h(fresh, kv, 0, wait=True)
        assert info.value.code == grpc.StatusCode.DATA_LOSS, info.value
        assert touched
        # The daemon wiped what failed authentication; nothing unauthenticated sits in the region.
        for i in touched:
            got = kv.array[i * CH : (i + 1) * CH]
            assert not got.any(), f"D2H message {i} that failed authentication left bytes in the region"
        with pytest.raises(ChannelDead):
            s.d2h(fresh[:CH], kv, 0)
        with pytest.raises(ChannelDead):
            s.h2d(kv, 0, CH, np.zeros(CH, np.uint8))
        wait_for(lambda: s.status().counters.channel_deaths == 1, "D2H: channel_deaths in status")
        assert any(e.get("session") == s.id for e in log_events(d, "channel_dead"))
    finally:
        s.close()
        bystander.check()


@pytest.mark.parametrize("kind", ["tamper", "reorder"])
def test_d2h_bounce_attacks_are_always_detected(attack_env: AttackEnv, kind: str) -> None:
    _d, c, _b = attack_env
    before = c.status().totals.channel_deaths
    for i in range(D2H_ATTEMPTS):
        run_d2h_attack(attack_env, kind, i)
    assert c.status().totals.channel_deaths - before == D2H_ATTEMPTS


def test_commit_missing_its_last_message_is_not_reported_as_success(attack_env: AttackEnv) -> None:
    """If the last DATA message of a commit never reaches the endpoint, nothing fails the tag check until
    the next message; the SDK knows the commit's ranges and must not return success with a hole in `dst`."""
    _d, c, _b = attack_env
    s = c.open_session("hole")
    try:
        data = rand(4 * CH, 3)
        w = s.alloc_region(4 * CH, readonly=True, data=data)
        real = s.core.apply_completion
        held: list[pb.Delivery] = []

        def drop_last(comp: pb.Completion) -> pb.Frame | None:
            held.extend(comp.deliveries)  # the host holds every message back until the commit's end ...
            if not comp.final:
                return None
            last = max(i for i, x in enumerate(held) if x.kind == DATA)  # ... and never delivers the last
            out: pb.Frame | None = real(
                pb.Completion(seq=comp.seq, deliveries=[x for i, x in enumerate(held) if i != last], final=True)
            )
            return out

        s.core.apply_completion = drop_last  # type: ignore[method-assign]
        dst = np.full(4 * CH, SENTINEL, np.uint8)
        with pytest.raises(PipeLLMError):
            s.h2d(w, 0, 4 * CH, dst)  # today: returns, with the last chunk of `dst` never written
    finally:
        s.close()


# -- a client killed mid-transfer --------------------------------------------------------------------------
VICTIM = """
import numpy as np, sys
from pipellm_client import Client
c = Client(sys.argv[1])
s = c.open_session("victim")
n = 16 << 20
w = s.alloc_region(n, readonly=True, data=np.ones(n, np.uint8))
kv = s.alloc_region(n)
dst = np.zeros(n, np.uint8)
print("ready", flush=True)
while True:
    s.h2d(w, 0, n, dst)
    s.d2h(dst, kv, 0, swap_out=True)
"""


def test_client_sigkilled_mid_transfer_is_cleaned_up(daemon: DaemonProcess) -> None:
    bystander = Bystander(daemon.socket, CH)
    victims = [
        subprocess.Popen([sys.executable, "-c", VICTIM, daemon.socket], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        for v in victims:
            assert v.stdout is not None and v.stdout.readline().strip() == "ready"
        c = bystander.client
        wait_for(lambda: sum(x.client_name == "victim" for x in c.list_sessions()) == 2, "victim sessions")
        # Let them get deep into transfers (bytes moving on both), then kill both without warning.
        wait_for(
            lambda: all(
                x.counters.bytes_h2d >= (32 << 20) and x.counters.bytes_d2h > 0
                for x in c.list_sessions()
                if x.client_name == "victim"
            ),
            "victims mid-transfer",
        )
        bystander.check()
        for v in victims:
            v.send_signal(signal.SIGKILL)
        for v in victims:
            v.wait(30)
        wait_for(lambda: [x.client_name for x in c.list_sessions()] == ["bystander"], "victim sessions closed")
        st = c.status()
        assert st.pool.arenas_in_use == 1, "only the bystander's arena is still in use"
        assert st.pool.h2d_slots_total == DEFAULT_H2D_SLOTS
        assert st.healthy and st.totals.channel_deaths == 0
        for _ in range(3):
            bystander.check()
        with Client(daemon.socket) as c2, c2.open_session("after") as s:
            w = s.alloc_region(1 << 20, readonly=True, data=rand(1 << 20, 8))
            dst = np.zeros(1 << 20, np.uint8)
            s.h2d(w, 0, 1 << 20, dst)
            assert (dst == w.array).all()
    finally:
        for v in victims:
            if v.poll() is None:
                v.kill()
                v.wait()
        bystander.close()
    closed = [e for e in log_events(daemon, "session_closed") if e.get("msg") == "client disconnected"]
    assert len(closed) == 2
    with Client(daemon.socket) as c:
        wait_for(lambda: c.status().pool.arenas_in_use == 0, "every arena back")


# -- the daemon killed and restarted on the same socket ------------------------------------------------------
def test_daemon_sigkilled_and_restarted() -> None:
    directory = tempfile.mkdtemp(prefix="pl-restart-")  # a short path: Unix socket names are limited
    try:
        d1 = DaemonProcess(directory=directory, workers=2, pool_bytes=1 << 30).start()
        try:
            c = Client(d1.socket)
            s = c.open_session("before")
            w, data = checked_weights(s, 8 << 20, 11)
            kv = s.alloc_region(1 << 20)
            old_key = s.core.endpoint.h2d[0].epoch.key_bytes()
            old_mask = s.core.endpoint.h2d[0].epoch.mask
            old_workers = [p.pid for p in worker_procs(d1.pid)]
            assert len(old_workers) == 2

            # Kill it while a transfer loop runs in another thread.
            def step(_: int) -> bool:
                out = np.zeros(8 << 20, np.uint8)
                s.h2d(w, 0, 8 << 20, out)
                return bool((out == data).all())

            bg = Background(step).start()  # never stopped: only the daemon's death may end it
            bg.wait_for(lambda: bg.rounds >= 2, "the loop to run")
            d1.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            d1.proc.wait(30)  # type: ignore[union-attr]
            bg.thread.join(30)
            assert not bg.thread.is_alive(), "a client call hung after the daemon died"
            assert bg.wrong is None
            assert isinstance(bg.exc, DaemonUnavailable), (bg.exc, bg.rounds)
            wait_for(lambda: not any(psutil.pid_exists(p) for p in old_workers), "workers die with the daemon")
            # Every next call on the old session is a clear DaemonUnavailable (or the session is dead).
            untouched = np.full(1 << 20, SENTINEL, np.uint8)
            with pytest.raises((DaemonUnavailable, ChannelDead)):
                s.h2d(w, 0, 1 << 20, untouched)
            with pytest.raises(DaemonUnavailable):
                c.status()
            # Restart on the same socket.
            d2 = start_again(directory, workers=2, pool_bytes=1 << 30)
            try:
                with pytest.raises((DaemonUnavailable, ChannelDead)):
                    s.h2d(w, 0, 1 << 20, untouched)
                with pytest.raises((DaemonUnavailable, ChannelDead)):
                    s.d2h(np.ones(4096, np.uint8), kv, 0, wait=True)
                assert (untouched == SENTINEL).all(), "nothing reached the old session's destination"
                s.close()
                c.close()
                with Client(d2.socket) as c2, c2.open_session("after") as s2:
                    new_key = s2.core.endpoint.h2d[0].epoch.key_bytes()
                    assert new_key != old_key and s2.core.endpoint.h2d[0].epoch.mask != old_mask
                    assert s2.id != s.id
                    w2 = s2.alloc_region(8 << 20, readonly=True, data=data)
                    out = np.zeros(8 << 20, np.uint8)
                    s2.h2d(w2, 0, 8 << 20, out)
                    assert (out == data).all()
                    ch = next(x for x in s2.status().channels if x.name == "Lce00_h2d_user")
                    assert ch.key_version == 0 and ch.chan_ctr == 0 and ch.messages == 8, "a fresh channel"
                    st = c2.status()
                    assert st.totals.channel_deaths == 0 and [x.client_name for x in st.sessions] == ["after"]
            finally:
                d2.stop()
        finally:
            d1.kill()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_old_client_recovers_after_daemon_restart() -> None:
    """A `Client` that outlived a daemon restart: it reconnects, or at least says the daemon went away."""
    directory = tempfile.mkdtemp(prefix="pl-restart2-")
    d1 = DaemonProcess(directory=directory, workers=1, pool_bytes=1 << 30).start()
    d2: DaemonProcess | None = None
    try:
        c = Client(d1.socket)
        assert c.status().healthy
        d1.kill()
        d2 = start_again(directory, workers=1, pool_bytes=1 << 30)
        for _ in range(2):  # the first call may report the loss; the next one must work again
            try:
                st = c.status()
            except DaemonUnavailable:
                continue
            assert st.healthy
            break
        else:
            raise AssertionError("the old Client never reconnected")
        with c.open_session("after") as s:
            assert s.status().counters.commits == 0
        c.close()
    finally:
        d1.kill()
        if d2 is not None:
            d2.stop()
        shutil.rmtree(directory, ignore_errors=True)


# -- a crypto worker killed mid-stream ----------------------------------------------------------------------
@pytest.mark.daemon_settings(workers=2, h2d_slots=16, demand_slots=4)
def test_crypto_worker_killed_mid_stream(daemon: DaemonProcess) -> None:
    layers = 8
    data = rand(layers << 20, 21)
    c = Client(daemon.socket)
    s = c.open_session("worker-kill")
    w = s.alloc_region(layers << 20, readonly=True, data=data)
    dst = np.zeros(4 << 20, np.uint8)

    def step(i: int) -> bool:
        first = (i % 2) * 4
        s.h2d(w, first << 20, 4 << 20, dst)  # a cycle of two 4-chunk commits: speculation runs ahead
        return bool((dst == data[first << 20 : (first + 4) << 20]).all())

    with Background(step) as bg:
        bg.wait_for(lambda: bg.rounds >= 6, "the transfer loop")
        kills = 0
        lost_jobs = 0
        while kills < 3:  # until a kill hits a worker with jobs in flight (normally the first one)
            victim = worker_procs(daemon.pid)[kills % 2]
            victim.send_signal(signal.SIGKILL)
            kills += 1

            def restarted(n: int = kills) -> bool:
                return c.status().workers.restarts == n and len(log_events(daemon, "worker_restart")) == n

            wait_for(restarted, "the worker restart, in status and in the log")
            lost_jobs = int(log_events(daemon, "worker_restart")[-1].get("jobs", 0))
            if lost_jobs:
                break

            def moving(mark: int = bg.rounds) -> bool:
                return bg.rounds >= mark + 2

            bg.wait_for(moving, "transfers after the kill")
        mark = bg.rounds
        bg.wait_for(lambda: bg.rounds >= mark + 10, "transfers after the restart")
    assert not bg.thread.is_alive()
    assert bg.exc is None, f"a transfer failed after a worker died: {bg.exc!r}"
    assert bg.wrong is None
    st = c.status()
    assert st.workers.restarts == kills and st.workers.count == 2 and st.healthy
    assert len(worker_procs(daemon.pid)) == 2
    assert st.totals.channel_deaths == 0
    print(f"worker kills={kills} lost_jobs={lost_jobs} commits={bg.rounds}")
    s.close()
    c.close()


@pytest.mark.daemon_settings(workers=2)
def test_crypto_worker_killed_mid_d2h(daemon: DaemonProcess) -> None:
    n = 8 << 20
    src = rand(n, 22)
    c = Client(daemon.socket)
    s = c.open_session("worker-kill-d2h")
    kv = s.alloc_region(n)

    def step(_: int) -> bool:
        s.d2h(src, kv, 0, wait=True)  # no swap_out: every job in flight is a D2H decryption
        return bool((kv.read() == src).all())

    with Background(step) as bg:
        bg.wait_for(lambda: bg.rounds >= 3, "the D2H loop")
        kills = 0
        while kills < 3:
            worker_procs(daemon.pid)[kills % 2].send_signal(signal.SIGKILL)
            kills += 1

            def logged(n: int = kills) -> bool:
                return len(log_events(daemon, "worker_restart")) == n

            wait_for(logged, "worker_restart logged")
            if int(log_events(daemon, "worker_restart")[-1].get("jobs", 0)):
                break
        mark = bg.rounds
        bg.wait_for(lambda: bg.rounds >= mark + 5, "landings after the restart")
    s.close()
    c.close()
    assert bg.exc is None, f"a D2H transfer failed after a worker died: {bg.exc!r}"
    assert bg.wrong is None


# -- the bounce pool exhausted ------------------------------------------------------------------------------
def test_pool_exhausted_refuses_new_sessions_until_one_leaves() -> None:
    layout = ArenaLayout(CH, 4, 2)
    with DaemonProcess(
        workers=1, chunk_size=CH, h2d_slots=4, d2h_slots=2, demand_slots=2, pool_bytes=3 * layout.size
    ) as d:
        c = Client(d.socket)
        assert c.status().pool.max_arenas == 3
        sessions = [c.open_session(f"p{i}") for i in range(3)]
        with pytest.raises(DaemonError) as info:
            c.open_session("one too many")
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "pool" in info.value.details
        sessions.pop().close()  # an orderly close frees its arena at once
        s = c.open_session("fits again")
        sessions.append(s)
        victim = sessions.pop(0)
        victim.fs.close()  # a disconnect frees it too, once the daemon notices
        wait_for(lambda: c.status().pool.arenas_in_use == 2, "the disconnected session's arena back")
        sessions.append(c.open_session("fits after disconnect"))
        for s in sessions:
            data = rand(3 * CH, 5)
            w = s.alloc_region(3 * CH, readonly=True, data=data)
            dst = np.zeros(3 * CH, np.uint8)
            s.h2d(w, 0, 3 * CH, dst)
            assert (dst == data).all()
        c.close()


def test_transfer_much_larger_than_the_arena_completes() -> None:
    n = 64 << 20
    settings: dict[str, Any] = {"workers": 2, "h2d_slots": 4, "d2h_slots": 2, "demand_slots": 2}
    with DaemonProcess(**settings) as d, Client(d.socket) as c, c.open_session("big") as s:
        assert s.core.layout.h2d_slots == 4 and s.core.arena is not None
        assert s.core.arena.size < n // 8
        data = rand(n, 31)
        w = s.alloc_region(n, readonly=True, data=data)
        dst = np.zeros(n, np.uint8)
        t0 = time.monotonic()
        s.h2d(w, 0, n, dst)
        assert (dst == data).all()
        # Several big transfers in one commit, and a big D2H through two slots.
        halves = [np.zeros(n // 2, np.uint8) for _ in range(2)]
        s.h2d_many([(w, 0, n // 2, halves[0]), (w, n // 2, n // 2, halves[1])])
        assert (np.concatenate(halves) == data).all()
        kv = s.alloc_region(n)
        s.d2h(data, kv, 0, wait=True)
        assert (kv.read() == data).all()
        elapsed = time.monotonic() - t0
        st = s.status()
        assert st.counters.bytes_h2d == 2 * n and st.counters.bytes_d2h == n
        assert c.status().pool.h2d_slots_total == 4
        print(f"3 x 64 MiB through a 4-slot arena in {elapsed:.2f} s")


def test_concurrent_sessions_hammering_a_small_pool() -> None:
    threads_n, rounds = 6, 25
    with DaemonProcess(workers=2, chunk_size=CH, h2d_slots=4, d2h_slots=2, demand_slots=2, pool_bytes=1 << 30) as d:
        errors: list[str] = []
        done = [0] * threads_n

        def hammer(i: int) -> None:
            try:
                with Client(d.socket) as c, c.open_session(f"hammer-{i}") as s:
                    n = 16 * CH
                    data = rand(n, 40 + i)
                    w = s.alloc_region(n, readonly=True, data=data)
                    kv = s.alloc_region(n)
                    rng = np.random.default_rng(i)
                    for r in range(rounds):
                        off = int(rng.integers(0, n - 1))
                        ln = int(rng.integers(1, n - off + 1))
                        dst = np.zeros(ln, np.uint8)
                        s.h2d(w, off, ln, dst)
                        if not (dst == data[off : off + ln]).all():
                            errors.append(f"thread {i} round {r}: wrong H2D bytes")
                        block = rand(4 * CH, 1000 * i + r)
                        s.d2h(block, kv, (r % 4) * 4 * CH, swap_out=True)
                        back = np.zeros(4 * CH, np.uint8)
                        s.h2d(kv, (r % 4) * 4 * CH, 4 * CH, back)
                        if not (back == block).all():
                            errors.append(f"thread {i} round {r}: wrong swap-in bytes")
                        s.h2d_many([(w, j * CH, CH, np.zeros(CH, np.uint8)) for j in range(8)])
                        done[i] += 1
            except BaseException as exc:
                errors.append(f"thread {i}: {exc!r}")

        t0 = time.monotonic()
        threads = [threading.Thread(target=hammer, args=(i,), daemon=True) for i in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), f"deadlock: rounds done {done}"
        assert errors == []
        assert done == [rounds] * threads_n
        with Client(d.socket) as c:
            st = c.status()
            assert st.healthy and st.totals.channel_deaths == 0 and st.pool.arenas_in_use == 0
        print(f"{threads_n} sessions x {rounds} rounds in {time.monotonic() - t0:.2f} s")


# -- the disk-less, GPU-less default -------------------------------------------------------------------------
def test_default_daemon_writes_nothing_but_its_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = Path(tempfile.mkdtemp(prefix="pl-tmp-"))
    monkeypatch.setenv("TMPDIR", str(scratch))  # whatever the daemon might write to a temp dir lands here
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        d = DaemonProcess()  # all defaults
        before = set(os.listdir(d.dir))
        with d:
            with Client(d.socket) as c, c.open_session("diskless") as s:
                _w, data = checked_weights(s, 3 << 20, 51)
                kv = s.alloc_region(3 << 20)
                s.d2h(data, kv, 0, wait=True)
                assert (kv.read() == data).all()
                st = c.status()
                assert st.mode == pb.MODE_PIPELLM and st.healthy
                assert [x.endpoint for x in st.sessions] == [pb.ENDPOINT_KIND_CPU]
                procs = [psutil.Process(d.pid), *worker_procs(d.pid)]
                assert len(procs) > 1
                for p in procs:
                    files = {f.path for f in p.open_files()}
                    assert files <= {str(d.log_path)}, f"pid {p.pid} has files open: {files}"
                    with contextlib.suppress(psutil.AccessDenied):
                        mapped = {m.path for m in p.memory_maps()}
                        assert not [m for m in mapped if "libcuda" in m or "/dev/nvidia" in m]
            during = set(os.listdir(d.dir))
            assert during - before == {"pipellmd.log", "pipellmd.sock", "pipellmd.sock.data"}
            assert [e.name for e in os.scandir(d.dir) if e.is_file(follow_symlinks=False)] == ["pipellmd.log"]
            assert d.stop() == 0
            assert set(os.listdir(d.dir)) == {"pipellmd.log"}, "a clean stop removes its sockets"
        assert list(scratch.iterdir()) == [], "the daemon wrote to TMPDIR"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
