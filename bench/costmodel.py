"""Measure the constants of the relinquish cost model on this host (config: cost_* and *_bytes_per_us).

When a speculated chunk is skipped or missed, the pipeline retires the IVs before it either one by one
(a NOP for a fresh IV, a DISCARD of existing ciphertext) or all at once with an IV rotation, whose price is
re-encrypting whatever it keeps. The per-message costs are paid at the endpoint, on the critical path:

    burn  = n_nop * cost_nop_us + sum(cost_discard_fixed_us + bytes / endpoint_bytes_per_us)
    rotate = cost_rotate_us + kept_bytes / (worker_bytes_per_us * workers)

This measures each term with the real code (Sender, CpuEndpoint, the worker pool), medians of many runs,
and prints the TOML lines to put in pipellmd.toml.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable

from pipellm_client.channel import KeyEpoch, RotationPolicy, Sender
from pipellm_client.endpoint import NOP_MESSAGE_LEN, NOP_PLAINTEXT, ChannelSecrets, CpuEndpoint, MsgKind

from .engine import ours

LABEL = "Lce00_h2d_user"


def median_us(fn: Callable[[], None], reps: int = 2000) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def pair() -> tuple[Sender, CpuEndpoint]:
    key, mask = os.urandom(32), os.urandom(12)
    tx = Sender(LABEL, KeyEpoch(LABEL, 0, key, mask), RotationPolicy())
    ep = CpuEndpoint([ChannelSecrets(0, key, mask, os.urandom(32), os.urandom(12))], RotationPolicy())
    return tx, ep


def nop_us() -> float:
    tx, ep = pair()
    cell = memoryview(bytearray(NOP_MESSAGE_LEN))

    def one() -> None:
        iv = tx.reserve()
        tx.seal_into(iv, NOP_PLAINTEXT, cell)
        tx.submit(iv)
        ep.receive(0, MsgKind.NOP, cell)

    return median_us(one)


def rotate_us() -> float:
    tx, ep = pair()

    def one() -> None:
        tx.reserve()
        ep.rotate_iv(0, tx.rotate_iv())

    return median_us(one)


def discard_us(n: int) -> float:
    tx, ep = pair()
    msgs = []
    for _ in range(200):
        iv = tx.reserve()
        out = bytearray(n + 16)
        tx.seal_into(iv, os.urandom(n), memoryview(out))
        msgs.append(bytes(out))
    it = iter(msgs)
    return median_us(lambda: ep.receive(0, MsgKind.DISCARD, next(it)), reps=len(msgs))


def main() -> int:
    nop = nop_us()
    rot = rotate_us()
    small, big = 4096, 1 << 20
    d_small, d_big = discard_us(small), discard_us(big)
    per_byte = (d_big - d_small) / (big - small)
    endpoint_rate = 1 / per_byte if per_byte > 0 else float("inf")
    fixed = max(0.0, d_small - small * per_byte)
    worker_gbps = asyncio.run(ours(1, ["1MiB"]))["1MiB"]
    worker_rate = worker_gbps * 1e3  # bytes per µs
    print("relinquish cost model, this host (medians):")
    print(f"  NOP (seal 4 bytes + endpoint verify):      {nop:8.2f} µs")
    print(f"  IV rotation (sender + endpoint):           {rot:8.2f} µs")
    print(f"  DISCARD 4 KiB / 1 MiB at the CPU endpoint: {d_small:8.2f} / {d_big:8.2f} µs")
    print(f"  -> endpoint decrypt {endpoint_rate:,.0f} B/µs, fixed part {fixed:.2f} µs")
    print(f"  worker encryption, 1 worker, 1 MiB jobs:   {worker_gbps:.2f} GB/s")
    print("\n# pipellmd.toml")
    print(f"cost_nop_us = {nop:.1f}\ncost_rotate_us = {rot:.1f}\ncost_discard_fixed_us = {fixed:.1f}")
    print(f"endpoint_bytes_per_us = {endpoint_rate:.0f}\nworker_bytes_per_us = {worker_rate:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
