"""Stateful property test of the channel model with real worker processes.

Random sequences of reserve / encrypt (any order, any worker) / NOP / submit / discard / IV rotation /
key rotation / tamper / replay / reorder / drop. Invariants: the endpoint accepts exactly the submitted
plaintexts in order; no (key, nonce) pair ever encrypts two different messages; every attack kills the
channel with nothing accepted.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pipellm_client import crypto
from pipellm_client.channel import KeyEpoch, ReservedIv, RotationPolicy, Sender
from pipellm_client.endpoint import NOP_MESSAGE_LEN, NOP_PLAINTEXT, ChannelSecrets, CpuEndpoint, MsgKind
from pipellm_client.errors import ChannelDead, TagMismatch
from pipellm_client.shm import SharedMemory

from pipellm_daemon import jobwire as w
from pipellm_daemon.workers import WorkerPool

from .conftest import NonceLedger

SLOTS = 12
SLOT = 4096 + 16
SIZES = st.sampled_from([1, 16, 100, 4095, 4096])


@dataclass
class Pending:
    iv: ReservedIv
    kind: MsgKind | None = None  # None while fresh
    slot: int = -1
    plaintext: bytes = b""


class Harness:
    """One process pool, one source region and one bounce arena shared by every example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = WorkerPool(2)
        self.loop.run_until_complete(self.pool.start())
        self.src = SharedMemory.create("prop-src", 64 << 10)
        self.src.view[:] = os.urandom(64 << 10)
        self.arena = SharedMemory.create("prop-arena", SLOTS * SLOT)
        self.h_src, self.h_arena = self.pool.new_handle(), self.pool.new_handle()
        self.pool.map(self.h_src, self.src)
        self.pool.map(self.h_arena, self.arena)

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()


HARNESS: Harness | None = None


@pytest.fixture(scope="module", autouse=True)
def harness() -> Iterator[Harness]:
    global HARNESS
    HARNESS = Harness()
    yield HARNESS
    HARNESS.close()
    HARNESS = None


class ChannelMachine(RuleBasedStateMachine):
    @initialize()
    def open_channel(self) -> None:
        assert HARNESS is not None
        self.h = HARNESS
        self.ledger = NonceLedger()
        crypto.set_auditor(self.ledger)
        self._new_keys()
        self.submitted: list[bytes] = []
        self.accepted: list[bytes] = []

    def _new_keys(self) -> None:
        key, mask = os.urandom(32), os.urandom(12)
        label = "Lce00_h2d_user"
        self.tx = Sender(label, KeyEpoch(label, 0, key, mask), RotationPolicy())
        self.ep = CpuEndpoint([ChannelSecrets(0, key, mask, os.urandom(32), os.urandom(12))], RotationPolicy())
        self.key_ids = {0: self.h.pool.add_key(key)}
        self.pending: list[Pending] = []
        self.free_slots = list(range(SLOTS))
        self.history: list[bytes] = []  # ciphertexts the endpoint accepted, for replays

    def teardown(self) -> None:
        crypto.set_auditor(None)
        for kid in self.key_ids.values():
            self.h.pool.drop_key(kid)

    # -- sender side -----------------------------------------------------------------------------
    @precondition(lambda self: len(self.pending) < SLOTS)
    @rule()
    def reserve(self) -> None:
        self.pending.append(Pending(self.tx.reserve()))

    def _encrypt(self, p: Pending, size: int, offset: int) -> None:
        p.slot = self.free_slots.pop()
        nonce = self.tx.take(p.iv, size)
        kid = self.key_ids[self.tx.epoch.version]
        fut = self.h.pool.submit(w.Kind.SEAL, kid, nonce, (self.h.h_src, offset), size, (self.h.h_arena, p.slot * SLOT))
        self.h.loop.run_until_complete(fut)
        p.kind = MsgKind.DATA
        p.plaintext = bytes(self.h.src.view[offset : offset + size])

    @precondition(lambda self: any(p.kind is None for p in self.pending) and bool(self.free_slots))
    @rule(pick=st.integers(0, 1000), size=SIZES, offset=st.integers(0, 60 << 10))
    def encrypt_on_a_worker(self, pick: int, size: int, offset: int) -> None:
        fresh = [p for p in self.pending if p.kind is None]
        self._encrypt(fresh[pick % len(fresh)], size, offset)  # any order

    @precondition(lambda self: any(p.kind is None for p in self.pending) and bool(self.free_slots))
    @rule(pick=st.integers(0, 1000))
    def burn_with_nop(self, pick: int) -> None:
        fresh = [p for p in self.pending if p.kind is None]
        p = fresh[pick % len(fresh)]
        p.slot = self.free_slots.pop()
        self.tx.seal_into(p.iv, NOP_PLAINTEXT, self.h.arena.view[p.slot * SLOT : p.slot * SLOT + NOP_MESSAGE_LEN])
        p.kind = MsgKind.NOP

    @precondition(lambda self: len(self.pending) + 6 <= SLOTS and bool(self.free_slots))
    @rule(count=st.integers(1, 6), size=SIZES, offset=st.integers(0, 60 << 10), reverse=st.booleans())
    def stream(self, count: int, size: int, offset: int, reverse: bool) -> None:
        """Reserve a run, encrypt it (maybe in reverse order), then submit everything ready at the head."""
        run = [Pending(self.tx.reserve()) for _ in range(count)]
        self.pending.extend(run)
        for p in reversed(run) if reverse else run:
            self._encrypt(p, size, offset)
        while self._head_ready():
            self.submit_head(False)

    def _head_ready(self) -> bool:
        return bool(self.pending) and self.pending[0].kind is not None and not self.ep.dead

    def _message(self, p: Pending) -> bytes:
        n = len(p.plaintext) + 16 if p.kind == MsgKind.DATA else NOP_MESSAGE_LEN
        return bytes(self.h.arena.view[p.slot * SLOT : p.slot * SLOT + n])

    @precondition(_head_ready)
    @rule(as_discard=st.booleans())
    def submit_head(self, as_discard: bool) -> None:
        p = self.pending.pop(0)
        self.tx.submit(p.iv)
        msg = self._message(p)
        if p.kind == MsgKind.DATA and not as_discard:
            dst = bytearray(len(p.plaintext))
            self.ep.receive(0, MsgKind.DATA, msg, memoryview(dst))
            self.submitted.append(p.plaintext)
            self.accepted.append(bytes(dst))
        else:
            self.ep.receive(0, MsgKind.NOP if p.kind == MsgKind.NOP else MsgKind.DISCARD, msg)
        self.history.append(msg)
        self.free_slots.append(p.slot)
        event(f"delivered {len(self.submitted)} data messages" if len(self.submitted) < 5 else "delivered >= 5")

    def _abandon_all(self) -> None:
        for p in self.pending:
            if p.slot >= 0:
                self.free_slots.append(p.slot)
        self.pending.clear()

    @precondition(lambda self: not self.ep.dead)
    @rule()
    def rotate_iv(self) -> None:
        self._abandon_all()
        self.ep.rotate_iv(0, self.tx.rotate_iv())

    @precondition(lambda self: not self.ep.dead)
    @rule()
    def rotate_key(self) -> None:
        self._abandon_all()
        version = self.tx.rotate_key()
        self.key_ids[version] = self.h.pool.add_key(self.tx.epoch.key_bytes())
        self.ep.rotate_key(0, version)

    # -- the untrusted host ----------------------------------------------------------------------
    @precondition(_head_ready)
    @rule(attack=st.sampled_from(["tamper", "replay", "reorder", "drop"]), byte=st.integers(0, 10_000))
    def attack(self, attack: str, byte: int) -> None:
        head = self.pending[0]
        msg = bytearray(self._message(head))
        if attack == "tamper":
            msg[byte % len(msg)] ^= 1 << (byte % 8)
        elif attack == "replay":
            if not self.history:
                return
            msg = bytearray(self.history[byte % len(self.history)])
        else:  # reorder / drop: something later arrives in the head's place
            later = [p for p in self.pending[1:] if p.kind is not None]
            if not later:
                return
            msg = bytearray(self._message(later[byte % len(later)]))
        event(f"attack: {attack}")
        self.tx.submit(head.iv)
        accepted_before = len(self.accepted)
        dst = bytearray(max(1, len(msg) - 16))
        with pytest.raises(TagMismatch):
            self.ep.receive(0, MsgKind.DATA, bytes(msg), memoryview(dst[: len(msg) - 16]))
        assert dst == bytes(len(dst)), "no unauthenticated plaintext in the destination"
        assert self.ep.dead and len(self.accepted) == accepted_before
        for p in self.pending[1:]:
            if p.kind is not None:
                with pytest.raises(ChannelDead):
                    self.ep.receive(0, MsgKind.DISCARD, self._message(p))
        # Recovery means a new channel with new keys.
        self._abandon_all()
        self._new_keys()

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def accepted_exactly_the_submitted(self) -> None:
        assert self.accepted == self.submitted

    @invariant()
    def no_key_nonce_pair_encrypts_two_messages(self) -> None:
        assert self.ledger.violations == []


ChannelMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=50, deadline=None, suppress_health_check=list(HealthCheck)
)
TestChannelMachine = ChannelMachine.TestCase


def test_the_ledger_catches_a_reused_nonce(harness: Harness) -> None:
    """The invariant check has teeth: two different messages under one (key, nonce) are flagged."""
    ledger = NonceLedger()
    crypto.set_auditor(ledger)
    try:
        kid = harness.pool.add_key(os.urandom(32))
        nonce = os.urandom(12)
        for offset in (0, 4096):
            fut = harness.pool.submit(w.Kind.SEAL, kid, nonce, (harness.h_src, offset), 64, (harness.h_arena, 0))
            harness.loop.run_until_complete(fut)
        assert len(ledger.violations) == 1
    finally:
        crypto.set_auditor(None)
