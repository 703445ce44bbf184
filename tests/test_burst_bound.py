"""The burst bound (bench/burst.py): an ideal host that encrypts each byte only once it could be known.

Hand-computed cases pin down each rule (issued, declared, swapped out, learned read-only repeats, earliest
need first), and on the quick suite the bound is never below the device model alone nor below what the
whole-run bound says of a trace with nothing known ahead.
"""

from __future__ import annotations

import pytest

from bench import workloads as W
from bench.burst import burst_bound_pct, burst_seconds
from bench.devicemodel import TESTBED, TimeScale

MiB = 1 << 20
RATE = 1e9  # bytes per testbed second: 1 MiB takes 1.048576 ms
LINK = TESTBED.link_bps


def _trace(*steps: tuple[W.Op, ...], regions: tuple[W.RegionSpec, ...] | None = None, warmup: int = 0) -> W.Trace:
    regs = regions or (W.RegionSpec("w", 64 * MiB), W.RegionSpec("kv", 64 * MiB, readonly=False))
    return W.Trace("t", "test", "", regs, tuple(W.Step(s, 1) for s in steps), warmup)


def _h2d(region: str, off: int, n: int) -> W.H2D:
    return W.H2D((W.Range(region, off, n),))


def test_a_transfer_known_only_when_issued_waits_for_all_its_bytes() -> None:
    ideal, burst = burst_seconds(_trace((_h2d("kv", 0, 8 * MiB), W.Sync())), RATE)
    assert ideal == pytest.approx(8 * MiB / LINK)
    assert burst == pytest.approx(8 * MiB / RATE)  # encryption and DMA pipelined: the slower one


def test_an_intent_declared_a_compute_ahead_hides_what_fits_in_that_compute() -> None:
    n, compute = 8 * MiB, 0.004  # encrypting takes 8.39 ms, the compute (the host waits for it) hides 4 of them
    wait = (W.Compute(compute, after_copies=False), W.Sync())
    tr = _trace((W.Declare((W.Range("kv", 0, n),)), *wait, _h2d("kv", 0, n), W.Sync()))
    ideal, burst = burst_seconds(tr, RATE)
    assert ideal == pytest.approx(compute + n / LINK)
    assert burst == pytest.approx(n / RATE)  # the rest of the encryption, then the last chunk's DMA is hidden
    # Long enough a compute hides it all: no overhead at all.
    wait = (W.Compute(0.02, after_copies=False), W.Sync())
    ideal, burst = burst_seconds(_trace((W.Declare((W.Range("kv", 0, n),)), *wait, _h2d("kv", 0, n), W.Sync())), RATE)
    assert burst == pytest.approx(ideal)
    # Without the intent the same transfer is known only when issued.
    _ideal, late = burst_seconds(_trace((*wait, _h2d("kv", 0, n), W.Sync())), RATE)
    assert late == pytest.approx(0.02 + n / RATE)


def test_an_intent_counts_once_and_a_replacing_declare_drops_the_old_ones() -> None:
    n = 4 * MiB
    body = (W.Compute(0.02, after_copies=False), W.Sync(), _h2d("kv", 0, n), W.Sync())
    _ideal, once = burst_seconds(_trace((W.Declare((W.Range("kv", 0, n),)), *body, *body)), RATE)
    # The second read was not declared again: it waits for its encryption in full.
    assert once == pytest.approx(2 * 0.02 + n / LINK + n / RATE)
    dropped = _trace((W.Declare((W.Range("kv", 0, n),)), W.Declare((W.Range("kv", n, n),), replace=True), *body))
    _ideal, burst = burst_seconds(dropped, RATE)
    assert burst == pytest.approx(0.02 + n / RATE)


def test_a_swapped_out_block_is_encrypted_again_only_after_its_data_has_landed() -> None:
    n = 4 * MiB
    tr = _trace((W.D2H(W.Range("kv", 0, n)), W.Sync(), _h2d("kv", 0, n), W.Sync()))
    ideal, burst = burst_seconds(tr, RATE)
    assert ideal == pytest.approx(2 * n / LINK)
    # The D2H copy ends at n/LINK (the host's sync waits for it); then its decryption and the swap-in's
    # encryption, one after the other, block the loop at the swap-in.
    assert burst == pytest.approx(n / LINK + 2 * n / RATE)
    # With compute between, the swap-in is encrypted ahead: known since its swap-out.
    tr = _trace((W.D2H(W.Range("kv", 0, n)), W.Compute(0.05, after_copies=False), W.Sync(), _h2d("kv", 0, n), W.Sync()))
    ideal, burst = burst_seconds(tr, RATE)
    assert burst == pytest.approx(ideal)


def test_a_repeating_read_only_load_is_learned_from_its_previous_pass() -> None:
    n = 4 * MiB
    layer = (_h2d("w", 0, n), W.Compute(0.01), W.Sync())
    ideal, burst = burst_seconds(_trace(layer, layer, layer, warmup=1), RATE)
    assert burst == pytest.approx(ideal)  # known a whole pass ahead, and a pass is longer than the encryption
    # A mutable range read again is not: the data may have changed.
    kv = (_h2d("kv", 0, n), W.Compute(0.01), W.Sync())
    ideal, burst = burst_seconds(_trace(kv, kv, kv, warmup=1), RATE)
    assert burst == pytest.approx(ideal + 2 * (n / RATE - n / LINK))


def test_earliest_need_first_a_later_intent_never_delays_an_earlier_transfer() -> None:
    big, small = 32 * MiB, 1 * MiB
    tr = _trace(
        (
            W.Declare((W.Range("kv", 0, big),)),  # needed late
            W.Declare((W.Range("kv", big, small),)),  # needed first
            _h2d("kv", big, small),
            W.Compute(0.1),
            W.Sync(),
            _h2d("kv", 0, big),
            W.Sync(),
        )
    )
    ideal, burst = burst_seconds(tr, RATE)
    assert burst == pytest.approx(ideal + small / RATE - small / LINK)  # only the first one's own bytes


def test_on_the_quick_suite_the_burst_bound_is_a_lower_bound_above_the_device_alone() -> None:
    for tr in W.suite("quick"):
        ideal, burst = burst_seconds(tr, 9e9)
        assert ideal == pytest.approx(tr.ideal_seconds())
        assert burst >= ideal * (1 - 1e-9)
        # Faster encryption never makes the bound larger.
        _i, faster = burst_seconds(tr, 18e9)
        assert faster <= burst * (1 + 1e-9)
    adv = next(t for t in W.suite("quick") if t.kind == "adversarial")
    # Nothing is known ahead in the adversarial trace: the burst bound is at least the whole-run one.
    scale = TimeScale(1.0, "test")
    whole = 100 * (1 - adv.ideal_seconds() / max(adv.ideal_seconds(), adv.crypto_bytes() / 9e9))
    assert burst_bound_pct(adv, 9e9, scale) >= whole - 1e-6
