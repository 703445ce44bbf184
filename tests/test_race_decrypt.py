"""The host may rewrite the bounce arena while we decrypt from it; no forged plaintext may ever pass.

AES-GCM code may read its input twice (GHASH, then CTR). A byte the host toggles between the two reads
passes the tag check yet changes the plaintext. `crypto.open_into` copies the arena through private
memory so each ciphertext byte is read once; these tests attack it with a real second process.

The attack: a victim process (a fresh interpreter per OpenSSL capability mask, since OpenSSL reads
OPENSSL_ia32cap once at start) puts a 1 MiB message in a memfd; a flipper process maps the same memfd
and toggles one ciphertext byte in a tight loop while the victim decrypts through the CPU endpoint's H2D
path (CpuEndpoint -> StrictReceiver.open_next) and the crypto worker's D2H OPEN job (Worker.run). The
old path (AESGCM.decrypt_into straight from the arena) runs as a calibration: it does accept forgeries
with software AES, which proves the attack is real.

Run by hand: `OPENSSL_ia32cap=<mask> python -m tests.test_race_decrypt 300` prints the victim's JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pipellm_client import crypto
from pipellm_client.channel import RotationPolicy, make_nonce
from pipellm_client.crypto import OPEN_PIECE, TAG_LEN
from pipellm_client.endpoint import ChannelSecrets, CpuEndpoint, MsgKind
from pipellm_client.errors import InvalidArgument, SlotError, TagMismatch

from pipellm_daemon import jobwire as w
from pipellm_daemon.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
MSG = 1 << 20
TRIALS = 300
MSG_OFF = 4096  # the message lives after the counter page, in its own cache lines
FLIP_AT = MSG // 2 + 3  # a ciphertext byte in the middle of the message
CAP_ENV = "OPENSSL_ia32cap"  # OpenSSL reads it (case-sensitive) once, when the library loads
MASKS = {
    "default": None,  # OpenSSL's best path here (VAES where the CPU has it)
    "no-vaes": ":~0x60000000000",
    "no-aesni": "~0x200000000000000:~0x60000000000",
}
FILL = 0xA5
PATH_BUDGET_S = 15.0  # per path and mask; a quiet machine needs 0.3-3 s

# The untrusted host: toggles one byte as fast as it can and publishes how often (so the victim can tell
# whether a write happened during a decryption); it stops when its parent, the victim, is gone.
FLIPPER = """
import mmap, os, struct, sys
fd, size, pos = map(int, sys.argv[1:4])
parent = os.getppid()
m = mmap.mmap(fd, size)
n = 0
while os.getppid() == parent:
    for _ in range(64):
        m[pos] ^= 1
    n += 64
    struct.pack_into("<Q", m, 0, n)
"""


# -- unit tests of the one decryption function ------------------------------------------------------
def seal(key: bytes, nonce: bytes, pt: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, pt, None)


SIZES = [0, 1, 15, 16, 17, 4095, OPEN_PIECE - 1, OPEN_PIECE, OPEN_PIECE + 1, 3 * OPEN_PIECE + 5, MSG]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("piece", [OPEN_PIECE, 1000])
def test_round_trip(n: int, piece: int) -> None:
    key, nonce, pt = os.urandom(32), os.urandom(12), os.urandom(n)
    out = bytearray(b"\x5a" * n)
    crypto.open_into(crypto.new_aead(key), nonce, seal(key, nonce, pt), memoryview(out), piece=piece)
    assert out == pt


def test_round_trip_from_shared_memory_and_sealed_by_us() -> None:
    key, nonce, pt = os.urandom(32), os.urandom(12), os.urandom(2 * OPEN_PIECE + 77)
    aead = crypto.new_aead(key)
    m = mmap.mmap(-1, len(pt) + TAG_LEN + 100, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    view = memoryview(m)
    crypto.seal_into(aead, crypto.key_tag(key), nonce, pt, view[100 : 100 + len(pt) + TAG_LEN])
    out = bytearray(len(pt))
    crypto.open_into(aead, nonce, view[100 : 100 + len(pt) + TAG_LEN], memoryview(out))
    assert out == pt
    view.release()
    m.close()


@pytest.mark.parametrize("n", [4, OPEN_PIECE, 3 * OPEN_PIECE + 5])
def test_tampering_anywhere_is_refused_and_wipes(n: int) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    aead, msg = crypto.new_aead(key), seal(key, nonce, os.urandom(n))
    spots = sorted({0, n // 2, n - 1, min(n - 1, OPEN_PIECE), n, n + TAG_LEN - 1})  # ciphertext and tag
    for at in spots:
        bad = bytearray(msg)
        bad[at] ^= 0x01
        out = bytearray([FILL]) * n
        with pytest.raises(TagMismatch):
            crypto.open_into(aead, nonce, bad, memoryview(out))
        assert out == bytes(n), f"plaintext left behind after tampering at byte {at}"
    out = bytearray([FILL]) * n
    with pytest.raises(TagMismatch):
        crypto.open_into(aead, os.urandom(12), msg, memoryview(out))  # wrong nonce
    assert out == bytes(n)


@pytest.mark.parametrize("length", range(TAG_LEN))
def test_shorter_than_a_tag_is_refused(length: int) -> None:
    with pytest.raises(SlotError, match="shorter than a tag"):
        crypto.open_into(crypto.new_aead(bytes(32)), bytes(12), bytes(length), memoryview(bytearray(0)))


def test_bad_sizes_are_refused() -> None:
    aead = crypto.new_aead(bytes(32))
    with pytest.raises(SlotError, match="exactly 4 bytes"):
        crypto.open_into(aead, bytes(12), bytes(20), memoryview(bytearray(5)))
    with pytest.raises(InvalidArgument, match="nonce"):
        crypto.open_into(aead, bytes(11), bytes(20), memoryview(bytearray(4)))
    with pytest.raises(InvalidArgument, match="key"):
        crypto.new_aead(bytes(16))
    with pytest.raises(InvalidArgument, match="piece"):
        crypto.open_into(aead, bytes(12), bytes(20), memoryview(bytearray(4)), piece=0)


def test_aead_repr_shows_no_key() -> None:
    key = bytes(range(32))
    assert key.hex() not in repr(crypto.new_aead(key)) and "AES-256-GCM" in repr(crypto.new_aead(key))


def test_threads_each_use_their_own_private_buffer() -> None:
    key = os.urandom(32)
    aead = crypto.new_aead(key)
    failures: list[str] = []

    def run(seed: int) -> None:
        for i in range(20):
            nonce, pt = os.urandom(12), bytes([seed]) * (2 * OPEN_PIECE + i)
            out = bytearray(len(pt))
            crypto.open_into(aead, nonce, seal(key, nonce, pt), memoryview(out))
            if out != pt:
                failures.append(f"thread {seed} message {i}")

    threads = [threading.Thread(target=run, args=(s,)) for s in range(1, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@contextlib.contextmanager
def _worker_with_two_maps(size: int, key_id: int, key: bytes) -> Iterator[tuple[Worker, mmap.mmap, mmap.mmap]]:
    """A Worker (in this process) with memfds of `size` bytes mapped as handles 1 (read-only to it) and
    2 (writable), and `key` as `key_id`; yields the worker and this process's mappings of 1 and 2."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [os.memfd_create("one"), os.memfd_create("two")]
    for fd in fds:
        os.ftruncate(fd, size)
    worker = Worker(a)
    worker.handle(w.MAP.pack(w.Op.MAP, 1, size, 0), [os.dup(fds[0])])
    worker.handle(w.MAP.pack(w.Op.MAP, 2, size, 1), [os.dup(fds[1])])
    worker.handle(w.KEY.pack(w.Op.KEY, key_id, key), [])
    one, two = mmap.mmap(fds[0], size), mmap.mmap(fds[1], size)
    try:
        yield worker, one, two
    finally:
        for h in (1, 2):
            worker.handle(w.HANDLE.pack(w.Op.UNMAP, h), [])
        one.close()
        two.close()
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_worker_open_job_uses_the_race_proof_path() -> None:
    """Worker.run's OPEN: OK and exact plaintext, TAG with the region wiped, ERROR out of range."""
    key, nonce, pt = os.urandom(32), os.urandom(12), os.urandom(OPEN_PIECE + 33)
    with _worker_with_two_maps(1 << 20, 7, key) as (worker, arena, region):
        arena[64 : 64 + len(pt) + TAG_LEN] = seal(key, nonce, pt)
        job = w.Job(w.Kind.OPEN, 1, 7, nonce, 1, 64, len(pt), 2, 128)
        assert worker.run(job) == w.Status.OK
        assert region[128 : 128 + len(pt)] == pt
        arena[64 + 5] ^= 1
        assert worker.run(job) == w.Status.TAG
        assert region[128 : 128 + len(pt)] == bytes(len(pt))
        assert worker.run(w.Job(w.Kind.OPEN, 2, 7, nonce, 1, (1 << 20) - 100, len(pt), 2, 0)) == w.Status.ERROR


def test_worker_seal_job_goes_through_the_audited_door(ledger: Any) -> None:
    """Worker.run's SEAL is `crypto.seal_job`: exact ciphertext, and an auditor installed in the worker's
    process (a test's; a real worker process has none) sees it once, under the pool's key tag."""
    key, nonce, pt = os.urandom(32), os.urandom(12), os.urandom(5000)
    with _worker_with_two_maps(1 << 16, 3, key) as (worker, region, arena):
        region[100 : 100 + len(pt)] = pt
        assert worker.run(w.Job(w.Kind.SEAL, 1, 3, nonce, 1, 100, len(pt), 2, 64)) == w.Status.OK
        assert arena[64 : 64 + len(pt) + TAG_LEN] == seal(key, nonce, pt)
        assert ledger.count == 1 and set(ledger.seen) == {(crypto.key_tag(key), nonce)}
        assert worker.run(w.Job(w.Kind.SEAL, 2, 3, nonce, 1, 100, len(pt), 2, (1 << 16) - 10)) == w.Status.ERROR


@pytest.mark.parametrize("inline", [False, True])
def test_pool_open_round_trip_and_tamper(inline: bool, ledger: Any) -> None:
    """Through a real worker process (started as the daemon starts it) and the inline mode."""
    from pipellm_client.shm import SharedMemory

    from pipellm_daemon.workers import WorkerPool

    async def run() -> None:
        pool = WorkerPool(1, inline=inline)
        await pool.start()
        arena, region = SharedMemory.create("arena", 4 << 20), SharedMemory.create("region", 4 << 20)
        ha, hr = pool.new_handle(), pool.new_handle()
        pool.map(ha, arena)
        pool.map(hr, region)
        key = os.urandom(32)
        kid = pool.add_key(key)
        nonce, pt = os.urandom(12), os.urandom(1000)
        region.view[:1000] = pt
        await pool.submit(w.Kind.SEAL, kid, nonce, (hr, 0), 1000, (ha, 0))
        assert bytes(arena.view[: 1000 + TAG_LEN]) == seal(key, nonce, pt)
        assert ledger.count == 1, "a SEAL job is audited once (inline: by the door; else by the pool)"
        for i, n in enumerate([0, 5, OPEN_PIECE + 1, 3 * OPEN_PIECE - 7]):
            nonce, pt = os.urandom(12), os.urandom(n)
            arena.view[i : i + n + TAG_LEN] = seal(key, nonce, pt)
            await pool.submit(w.Kind.OPEN, kid, nonce, (ha, i), n, (hr, 64))
            assert bytes(region.view[64 : 64 + n]) == pt
            if n:
                arena.view[i + n // 2] ^= 0x80
                with pytest.raises(TagMismatch):
                    await pool.submit(w.Kind.OPEN, kid, nonce, (ha, i), n, (hr, 64))
                assert bytes(region.view[64 : 64 + n]) == bytes(n)
        if not inline:  # the worker loaded the SDK's crypto module, not the SDK (grpc, numpy)
            maps = Path(f"/proc/{pool.pids()[0]}/maps").read_text()
            assert "cygrpc" not in maps and "_multiarray_umath" not in maps
        await pool.close()
        arena.close()
        region.close()

    asyncio.run(run())


# -- the attack ---------------------------------------------------------------------------------------
def victim(trials: int) -> dict[str, Any]:
    """Runs in a fresh interpreter: one message in a memfd, a flipper on it, every decryption path."""
    key, mask = os.urandom(32), os.urandom(12)
    nonce = make_nonce(mask, 0, 1)  # message 1 of a fresh H2D channel
    pt = os.urandom(MSG)
    size = MSG_OFF + MSG + TAG_LEN
    fd = os.memfd_create("race-arena")
    os.ftruncate(fd, size)
    arena = mmap.mmap(fd, size)
    arena[MSG_OFF : MSG_OFF + MSG + TAG_LEN] = seal(key, nonce, pt)
    message = memoryview(arena)[MSG_OFF : MSG_OFF + MSG + TAG_LEN]

    secrets = ChannelSecrets(0, key, mask, os.urandom(32), os.urandom(12))
    dst = bytearray(MSG)
    fill = bytes([FILL]) * MSG

    endpoints: list[CpuEndpoint] = []

    def endpoint_reset() -> None:  # a fresh endpoint per trial (a tag failure kills the channel)
        dst[:] = fill
        endpoints.append(CpuEndpoint([secrets], RotationPolicy()))

    def endpoint_path() -> bool:
        ep = endpoints.pop() if endpoints else CpuEndpoint([secrets], RotationPolicy())
        try:
            ep.receive(0, MsgKind.DATA, message, memoryview(dst))
            return True
        except TagMismatch:
            return False
        finally:
            ep.close()

    sock_a, _sock_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    region_fd = os.memfd_create("race-region")
    os.ftruncate(region_fd, MSG)
    worker = Worker(sock_a)
    worker.handle(w.MAP.pack(w.Op.MAP, 1, size, 0), [os.dup(fd)])
    worker.handle(w.MAP.pack(w.Op.MAP, 2, MSG, 1), [os.dup(region_fd)])
    worker.handle(w.KEY.pack(w.Op.KEY, 1, key), [])
    region = mmap.mmap(region_fd, MSG)
    job = w.Job(w.Kind.OPEN, 1, 1, nonce, 1, MSG_OFF, MSG, 2, 0)

    def worker_path() -> bool:
        status = worker.run(job)
        assert status in (w.Status.OK, w.Status.TAG), status
        return status == w.Status.OK

    old = AESGCM(key)

    def unsafe_path() -> bool:  # what every CPU decryption did before: straight from the arena
        try:
            old.decrypt_into(nonce, message, None, dst)
            return True
        except Exception:
            dst[:] = bytes(MSG)
            return False

    paths = {
        "endpoint": (endpoint_path, lambda: dst, endpoint_reset),
        "worker": (worker_path, lambda: region[:], lambda: region.__setitem__(slice(None), fill)),
        "unsafe": (unsafe_path, lambda: dst, lambda: dst.__setitem__(slice(None), fill)),
    }
    for run, _out, _reset in paths.values():  # warm up, and check the untouched message decrypts
        assert run(), "an untouched message was refused"

    flipper = subprocess.Popen(
        [sys.executable, "-c", FLIPPER, str(fd), str(size), str(MSG_OFF + FLIP_AT)], pass_fds=[fd]
    )

    def flips() -> int:
        return int(struct.unpack_from("<Q", arena, 0)[0])

    results: dict[str, Any] = {"openssl_ia32cap": os.environ.get(CAP_ENV), "wanted_raced": trials}
    try:
        deadline = time.monotonic() + 30
        while flips() == 0:
            assert flipper.poll() is None and time.monotonic() < deadline, "the flipper never started"
            time.sleep(0.001)
        for name, (run, out, reset) in paths.items():
            counts = {"trials": 0, "accepted": 0, "forged": 0, "mismatch": 0, "unwiped": 0, "raced": 0}
            t0 = time.perf_counter()
            # Count `trials` decryptions during which the host wrote; a loaded machine may starve the
            # flipper now and then, so keep trying for up to PATH_BUDGET_S.
            give_up = time.monotonic() + PATH_BUDGET_S
            while counts["raced"] < trials and time.monotonic() < give_up:
                counts["trials"] += 1
                reset()
                before = flips()
                ok = run()
                counts["raced"] += flips() != before  # the host wrote during this decryption
                got = out()
                if ok:
                    counts["accepted"] += 1
                    counts["forged"] += got != pt
                else:
                    counts["mismatch"] += 1
                    counts["unwiped"] += got != bytes(MSG)
            counts["ms_per_trial"] = round((time.perf_counter() - t0) / counts["trials"] * 1e3, 2)
            results[name] = counts
    finally:
        flipper.kill()
        flipper.wait()
    results["flips"] = flips()
    return results


def run_victim(mask: str | None, trials: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != CAP_ENV}
    if mask is not None:  # an empty value would mean "no capabilities at all", so unset for the default
        env[CAP_ENV] = mask
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_race_decrypt", str(trials)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("mask", list(MASKS))
def test_host_writes_during_decryption_never_forge(mask: str) -> None:
    res = run_victim(MASKS[mask], TRIALS)
    print(json.dumps(res))
    for path in ("endpoint", "worker"):
        r = res[path]
        assert r["forged"] == 0, f"{path}: {r['forged']} forged plaintexts accepted under mask {mask}: {r}"
        assert r["unwiped"] == 0, f"{path}: plaintext left behind after a tag failure: {r}"
        # The test can fail: the host really wrote during TRIALS decryptions, and the toggled byte was
        # seen in both states (some refused, some accepted).
        assert r["raced"] >= TRIALS, f"{path}: the host wrote during only {r['raced']} decryptions: {r}"
        assert r["mismatch"] >= r["trials"] // 10, f"{path}: the flipped byte was hardly ever seen: {r}"
        assert r["accepted"] >= r["trials"] // 10, f"{path}: the original byte was hardly ever seen: {r}"
    if mask == "no-aesni":  # calibration: software AES reads the input twice, so the old path is forgeable
        assert res["unsafe"]["forged"] > 0, f"the attack found no forgery on the old path: {res['unsafe']}"


if __name__ == "__main__":
    print(json.dumps(victim(int(sys.argv[1]) if len(sys.argv) > 1 else TRIALS)))
