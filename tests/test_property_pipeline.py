"""Stateful property test of the real pipeline (daemon side) against the real endpoint (client side).

Random intents, commits in and out of the predicted order, region writes between pre-encryption and
commit, small and unpredicted transfers, D2H swaps, several sessions sharing the crypto workers.
Invariants: the endpoint receives exactly the committed bytes, in commit order; no (key, nonce) pair
encrypts two different messages; no stale byte is ever delivered; the counters add up.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pipellm_client import crypto
from pipellm_client.channel import RotationPolicy

from pipellm_daemon.config import Config
from pipellm_daemon.workers import WorkerPool

from .conftest import NonceLedger
from .pipeline_harness import PipelinePair, settle

CHUNK = 64 << 10
CFG = Config(
    chunk_size=CHUNK, h2d_slots=8, d2h_slots=4, demand_slots=2, max_depth=6, ahead_bytes=6 * CHUNK,
    small_transfer_threshold=16 << 10, generation_granule=4096, pool_bytes=1 << 30,
)  # fmt: skip
REGION = 8 * CHUNK
# Counters whose being non-zero in an example is reported to hypothesis (`event`): what the run covered.
COVERAGE_EVENTS = [
    ("hits", "some hits"),
    ("ring_hits", "ring hits"),
    ("ring_discards", "ring discards"),
    ("iv_rotations", "iv rotations"),
    ("key_rotations", "key rotations"),
    ("nops", "nops"),
    ("discards", "discards"),
    ("stale", "stale detected"),
]


class World:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.workers = WorkerPool(2)
        self.loop.run_until_complete(self.workers.start())

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.workers.close())
        self.loop.close()


WORLD: World | None = None


@pytest.fixture(scope="module", autouse=True)
def world() -> Iterator[World]:
    global WORLD
    WORLD = World()
    yield WORLD
    WORLD.close()
    WORLD = None


offsets = st.integers(0, REGION - 1)


class PipelineMachine(RuleBasedStateMachine):
    @initialize(tight_keys=st.booleans(), ring=st.booleans())
    def setup(self, tight_keys: bool, ring: bool) -> None:
        assert WORLD is not None
        self.w = WORLD
        self.ledger = NonceLedger()
        crypto.set_auditor(self.ledger)
        # Tight key thresholds make key rotations happen inside the run.
        policy = RotationPolicy(upper=40_000, lower=20_000) if tight_keys else RotationPolicy()
        # With the delivery ring, hits are taken by the SDK straight from the published records.
        self.sessions = [PipelinePair(CFG, self.w.workers, policy, ring=ring) for _ in range(2)]
        self.regions = []
        rng = np.random.default_rng(0)
        for s in self.sessions:
            ro = s.region(REGION, readonly=True, data=rng.integers(0, 256, REGION, dtype=np.uint8))
            rw = s.region(REGION, readonly=False)
            rw.write(0, rng.integers(0, 256, REGION, dtype=np.uint8))
            self.regions.append((ro, rw))
        self.cycle = [(0, j * CHUNK, CHUNK) for j in range(6)]
        self.cycle_pos = [0, 0]
        self.spec_chunks = [0, 0]
        self.all_chunks = [0, 0]

    def teardown(self) -> None:
        crypto.set_auditor(None)
        for s in getattr(self, "sessions", []):
            s.close()

    def _commit(self, si: int, items: list[tuple[int, int, int, bool]]) -> None:
        s = self.sessions[si]
        transfers, expect = [], []
        for which, off, want_n, unpredicted in items:
            r = self.regions[si][which]
            n = max(1, min(want_n, r.size - off))
            dst = np.zeros(n, np.uint8)
            transfers.append((r, off, n, dst, unpredicted))
            expect.append(r.array[off : off + n].copy())  # the bytes as they are at commit time
            chunks = -(-n // CHUNK)
            self.all_chunks[si] += chunks
            if not unpredicted and n >= CFG.small_transfer_threshold:
                self.spec_chunks[si] += chunks
        self.w.run(s.commit(transfers))
        for (_r, _o, _n, dst, _u), want in zip(transfers, expect, strict=True):
            assert np.array_equal(dst, want), "the endpoint got bytes other than the committed ones"

    @rule(si=st.integers(0, 1), steps=st.integers(1, 8))
    def follow_the_cycle(self, si: int, steps: int) -> None:
        for _ in range(steps):
            which, off, n = self.cycle[self.cycle_pos[si] % len(self.cycle)]
            self.cycle_pos[si] += 1
            self._commit(si, [(which, off, n, False)])
        self.w.run(settle())

    @rule(
        si=st.integers(0, 1),
        items=st.lists(
            st.tuples(st.integers(0, 1), offsets, st.integers(1, 3 * CHUNK), st.booleans()), min_size=1, max_size=4
        ),
    )
    def commit_anything(self, si: int, items: list[tuple[int, int, int, bool]]) -> None:
        self._commit(si, items)

    @rule(
        si=st.integers(0, 1),
        chunks=st.lists(st.integers(0, 7), min_size=1, max_size=8),
        cyclic=st.booleans(),
        replace=st.booleans(),
        follow=st.booleans(),
    )
    def declare_and_maybe_follow(self, si: int, chunks: list[int], cyclic: bool, replace: bool, follow: bool) -> None:
        s = self.sessions[si]
        ro = self.regions[si][0]
        keys = [k for c in chunks for k in s.keys_of(ro, c * CHUNK, CHUNK)]
        s.pipeline.predictors.intents.declare(keys, replace=replace, cyclic=cyclic)
        s.pipeline.refill()
        self.w.run(settle())
        s.pipeline.doorbell()
        if follow:
            for c in chunks:
                self._commit(si, [(0, c * CHUNK, CHUNK, False)])

    @rule(si=st.integers(0, 1), off=offsets, n=st.integers(1, 2 * CHUNK), seed=st.integers(0, 2**16))
    def write_mutable(self, si: int, off: int, n: int, seed: int) -> None:
        rw = self.regions[si][1]
        n = min(n, rw.size - off)
        rw.write(off, np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))

    @rule(
        si=st.integers(0, 1),
        block=st.integers(0, 7),
        seed=st.integers(0, 2**16),
        group=st.integers(0, 3),
        back=st.booleans(),
    )
    def swap_out_and_maybe_in(self, si: int, block: int, seed: int, group: int, back: bool) -> None:
        s = self.sessions[si]
        rw = self.regions[si][1]
        src = np.random.default_rng(seed).integers(0, 256, CHUNK, dtype=np.uint8)
        self.w.run(s.d2h(src, rw, block * CHUNK, swap_out=True, group=group))
        assert np.array_equal(rw.array[block * CHUNK : (block + 1) * CHUNK], src), "D2H landed wrong bytes"
        self.w.run(settle())
        if back:
            self._commit(si, [(1, block * CHUNK, CHUNK, False)])

    @rule(
        si=st.integers(0, 1),
        blocks=st.lists(st.integers(0, 7), min_size=2, max_size=5, unique=True),
        seed=st.integers(0, 2**16),
        whole=st.booleans(),
    )
    def swap_out_several_and_back_reordered(self, si: int, blocks: list[int], seed: int, whole: bool) -> None:
        """Swap-ins in an order the swap predictor did not expect (it was told LIFO/FIFO by group), after
        swap-outs of one chunk each or one call larger than the D2H slots (it lands in pieces that
        `continue` the call): whatever was encrypted ahead is used, skipped or burned, never reused."""
        s = self.sessions[si]
        rw = self.regions[si][1]
        rng = np.random.default_rng(seed)
        if whole:  # 6 chunks through 4 D2H slots: two Landed frames, the second continues the first
            src = rng.integers(0, 256, 6 * CHUNK, dtype=np.uint8)
            self.w.run(s.d2h(src, rw, 0, swap_out=True, group=5))
            assert np.array_equal(rw.array[: 6 * CHUNK], src), "D2H landed wrong bytes"
            blocks = [b for b in blocks if b < 6] or [0, 1]
        else:
            for i, b in enumerate(blocks):
                src = rng.integers(0, 256, CHUNK, dtype=np.uint8)
                self.w.run(s.d2h(src, rw, b * CHUNK, swap_out=True, group=1 + i % 2))
        self.w.run(settle())
        for b in rng.permutation(blocks):
            self._commit(si, [(1, int(b) * CHUNK, CHUNK, False)])

    @precondition(lambda self: True)
    @rule()
    def let_workers_catch_up(self) -> None:
        self.w.run(settle(5))

    @invariant()
    def no_key_nonce_pair_encrypts_two_messages(self) -> None:
        assert self.ledger.violations == []

    @invariant()
    def counters_add_up(self) -> None:
        for si, s in enumerate(getattr(self, "sessions", [])):
            c = s.pipeline.counters
            assert c.hits + c.skips + c.misses + c.late == self.spec_chunks[si]
            assert c.chunks == self.all_chunks[si]
            assert c.bytes_wasted <= c.bytes_ahead
            for src, row in c.source_summary().items():  # per predictor: nothing used or wasted twice
                assert row["used"] + row["wasted"] <= row["ahead"], (src, row)
            assert c.bytes_used + c.bytes_wasted <= c.bytes_ahead
            # Stale ciphertext in the queue makes its chunk a miss; a stale published record is burned by
            # DISCARD (with every record after it), and its chunk may still hit a fresher entry made after it.
            assert c.detours <= c.misses and c.stale <= c.misses + c.ring_discards
            assert s.pipeline.dead is None and s.core.dead is None
            queued = s.pipeline.speculative.queue
            held = sum(e.nbytes for e in queued if e.state != 0)
            assert s.pipeline.speculation.ahead_bytes == held, "ahead-bytes bookkeeping"
            ep = s.core.endpoint
            assert ep.dead is None
            for counter, label in COVERAGE_EVENTS:
                if getattr(c, counter):
                    event(label)


PipelineMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PIPELLM_PROPERTY_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestPipelineMachine = PipelineMachine.TestCase
