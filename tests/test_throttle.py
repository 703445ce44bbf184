"""A learned predictor whose ciphertext is thrown away speculates one chunk at a time; declared ones never."""

from __future__ import annotations

import dataclasses

from pipellm_daemon.counters import Counters
from pipellm_daemon.throttle import SourceThrottle

from .pipeline_harness import settle
from .test_pipeline import CHUNK, declare, fetch, setup

MiB = 1 << 20


def test_the_share_of_used_bytes_sets_a_learned_sources_depth() -> None:
    c = Counters()
    t = SourceThrottle(c)
    assert t.depth("cycle", 16) == 16  # trusted until its ciphertext is judged
    c.wasted("cycle", 8 * MiB)
    t.update()
    assert t.share["cycle"] == 0.5 and t.depth("cycle", 16) == 16
    c.wasted("cycle", 4 * MiB)
    t.update()
    assert t.depth("cycle", 16) == 1 and t.depth("cycle", 0) == 0
    assert t.depth("lora", 16) == 16, "each source is judged on its own ciphertext"
    assert t.depth("intents", 16) == t.depth("swap", 16) == 16, "declared sources are never throttled"
    c.used("cycle", 4 * MiB)
    t.update()
    assert t.depth("cycle", 16) == 16, "guesses that land again earn the depth back"
    t.update()  # nothing new: the share stays
    assert t.share["cycle"] == 0.625


def test_one_chunk_hints_in_front_of_a_cycle_take_the_second_channel(loop_and_pool) -> None:
    """A one-chunk hint in front of the cycle's ciphertext (more bytes, still predicted): the hinted chunk is
    a detour and the cycle's ciphertext is neither abandoned nor wasted, so nothing throttles the cycle."""
    loop, pair, ro, data = setup(loop_and_pool)
    p = pair.pipeline
    for _ in range(4):
        for j in range(6):
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    loop.run_until_complete(settle(2, [p]))
    before = dataclasses.replace(p.counters)
    for j in (8, 9, 10, 11, 12):
        declare(loop, pair, ro, [j])
        assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
        p.predictors.intents.cancel()
        p.refill()
        loop.run_until_complete(settle(2, [p]))
    c = dataclasses.replace(p.counters)
    assert c.iv_rotations == before.iv_rotations and c.detours - before.detours == 5
    assert c.cycle_bytes_wasted == before.cycle_bytes_wasted and p.speculation.throttle.share["cycle"] == 1.0
    for j in range(6):  # and the kept ciphertext serves the cycle's next pass
        assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    assert p.counters.hits - c.hits == 6
    pair.close()


def test_a_cycle_whose_guesses_hints_keep_replacing_speculates_one_chunk(loop_and_pool) -> None:
    loop, pair, ro, data = setup(loop_and_pool)
    p = pair.pipeline
    for _ in range(4):  # a cycle over chunks 0..5, learned and then hit
        for j in range(6):
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
    loop.run_until_complete(settle(2, [p]))
    assert p.predictors.last_source == "cycle" and len(p.speculative.queue) > 1
    hint = list(range(6, 15))  # at least as many bytes as the cycle holds ahead: the hint preempts it
    for _ in range(5):  # hints keep arriving in front of the cycle's guesses: each wastes them
        declare(loop, pair, ro, hint)
        for j in hint:
            assert (fetch(loop, pair, ro, j) == data[j * CHUNK : (j + 1) * CHUNK]).all()
        p.predictors.intents.cancel()
        p.refill()
        loop.run_until_complete(settle(2, [p]))
    assert p.speculation.throttle.share["cycle"] < 0.5
    assert len(p.speculative.queue) <= 1, "a wasteful learned source speculates one chunk at a time"
    pair.close()
