"""`make bench-commit`: the critical-path cost of committing a chunk whose ciphertext is already made.

In one run: (a) the time to encrypt a 1 MiB chunk with the same library, in this process; (b) the time
of `Session.h2d` for a 1 MiB chunk that the daemon encrypted ahead — with the delivery ring, a hit the SDK
takes from the published records without asking the daemon; without it (the baseline, interleaved in the
same run), a commit frame out, the daemon finds the ready slot, a completion frame back, a release out —
with the endpoint's decryption left out: on a GPU host the GPU decrypts, so the endpoint here only
consumes the IV (verify sampling, stated); (c) the same with 64 chunks in one commit, per chunk; (d) what
`Session.declare` of 64 intents costs the serving loop (a fire-and-forget data-plane frame). Ratios are
(b) / (a), with the ring; the last line is
`commit: p50_ratio=<x> p99_ratio=<y> batched_us_per_chunk=<z> declare_us_per_64=<d>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client import Client, Intent
from pipellm_client.shm import SharedMemory

from pipellm_daemon.launcher import DaemonProcess

CHUNK = 1 << 20
NO_DECRYPT = 1 << 40  # verify one DATA message in 2^40: none, the endpoint only advances its counter


def encrypt_time_us(reps: int = 400) -> float:
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    src = SharedMemory.create("src", 32 * CHUNK)
    src.view[:] = os.urandom(32 * CHUNK)
    dst = SharedMemory.create("dst", CHUNK + 16)
    dst.prefault()
    times = []
    for i in range(reps):
        off = (i % 32) * CHUNK
        t0 = time.perf_counter()
        aead.encrypt_into(nonce, src.view[off : off + CHUNK], None, dst.view)
        times.append(time.perf_counter() - t0)
    src.close()
    dst.close()
    return statistics.median(times) * 1e6


def wait_ready(s, want: int, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Until the daemon holds `want` chunks encrypted ahead (polling its queue depth)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = s.status()
        if st.depth >= want and st.counters.bytes_ahead >= want * CHUNK:
            time.sleep(0.002 * want)
            return
        time.sleep(0.001)


def measure(commits: int, ring: bool) -> dict[str, float]:
    """One daemon (delivery ring on or off): hit latencies, batched cost per chunk, declare cost."""
    chunks = 16
    with (
        DaemonProcess(max_depth=64, h2d_slots=80, ahead_bytes=80 * CHUNK, delivery_ring=ring) as d,
        Client(d.socket) as c,
        c.open_session("bench-commit", verify=NO_DECRYPT, allow_unverified=True) as s,
    ):
        data = np.random.default_rng(0).integers(0, 256, 64 * CHUNK, dtype=np.uint8)
        w = s.alloc_region(64 * CHUNK, readonly=True, data=data)
        dst = np.empty(CHUNK, np.uint8)
        s.declare([Intent(w, j * CHUNK, CHUNK) for j in range(chunks)], cyclic=True)
        wait_ready(s, 8)
        lat = []
        for i in range(commits):
            j = i % chunks
            time.sleep(0.001)  # slack between commits, as a GPU computing leaves: the next chunk's encryption
            t0 = time.perf_counter()
            s.h2d(w, j * CHUNK, CHUNK, dst)
            lat.append(time.perf_counter() - t0)
        single = s.status().counters
        s.cancel_intents()
        # Batched: 64 chunks per commit, all encrypted ahead.
        s.declare([Intent(w, j * CHUNK, CHUNK) for j in range(64)], replace=True, cyclic=True)
        batch = [(w, j * CHUNK, CHUNK, np.empty(CHUNK, np.uint8)) for j in range(64)]
        per_chunk = []
        for _ in range(8):
            wait_ready(s, 60)
            t0 = time.perf_counter()
            s.h2d_many(batch)
            per_chunk.append((time.perf_counter() - t0) / 64)
        s.cancel_intents()
        intents = [Intent(w, j * CHUNK, CHUNK) for j in range(64)]
        declare = []
        for i in range(200):
            t0 = time.perf_counter()
            s.declare(intents, replace=True)
            declare.append(time.perf_counter() - t0)
            if i % 20 == 19:
                s.cancel_intents()
                s.status()  # a round trip: the daemon keeps up, nothing piles up in the socket
        s.cancel_intents()
    lat_us = sorted(x * 1e6 for x in lat[len(lat) // 10 :])  # drop the warm-up tenth
    judged = max(1, single.hits + single.misses + single.skips + single.late)
    return {
        "p50": statistics.median(lat_us),
        "p99": lat_us[int(0.99 * (len(lat_us) - 1))],
        "batched": statistics.median(per_chunk) * 1e6,
        "declare": statistics.median(declare[20:]) * 1e6,
        "hit": single.hits / judged,
        "ring_hits": single.ring_hits / judged,
        "n": len(lat_us),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--commits", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of ring on / ring off")
    args = ap.parse_args(argv)
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    enc: list[float] = []
    for _ in range(args.rounds):
        for ring in (True, False):
            enc.append(encrypt_time_us())
            runs[ring].append(measure(args.commits, ring))
    enc_us = statistics.median(enc)

    def med(ring: bool, k: str) -> float:
        return statistics.median(r[k] for r in runs[ring])

    print(f"encrypt 1 MiB in-process: {enc_us:.1f} µs ({CHUNK / enc_us / 1e3:.2f} GB/s), median of {len(enc)}")
    for ring, name in ((True, "delivery ring"), (False, "no ring (every hit a commit round trip)")):
        print(
            f"{name}: commit of a pre-encrypted 1 MiB chunk p50 {med(ring, 'p50'):.1f} µs, "
            f"p99 {med(ring, 'p99'):.1f} µs (hit rate {med(ring, 'hit'):.1%}, from the ring "
            f"{med(ring, 'ring_hits'):.1%}; endpoint decryption excluded: it is the GPU's work); batched "
            f"{med(ring, 'batched'):.1f} µs per chunk; declare of 64 intents {med(ring, 'declare'):.1f} µs"
        )
    print(f"(medians of {args.rounds} interleaved rounds of {args.commits} commits each)")
    print(
        f"commit: p50_ratio={med(True, 'p50') / enc_us:.3f} p99_ratio={med(True, 'p99') / enc_us:.3f} "
        f"batched_us_per_chunk={med(True, 'batched'):.1f} declare_us_per_64={med(True, 'declare'):.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
