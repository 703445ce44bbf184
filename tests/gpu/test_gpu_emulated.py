"""aesgcm.cu itself, compiled as host C++ and run on the CPU (tests/gpu/emu), against
`cryptography` and launch by launch against the numpy reference, one message and batches.

This is how the kernel source is executed on machines without a GPU: every index, padding, byte
swap, tail mask, flag write, the batch table, the block-to-message search, the batch gate and the
launch plan are the real ones; only the CUDA built-ins are re-implemented (cuda_emu.h).

What "untouched" means for a batch with a bad tag: no destination of the batch -- before, at or
after the failing message -- receives a single byte (each keeps its sentinel), the guard bytes
around every buffer are intact, the failing message's flag is BAD and the others' are OK (each
tag is checked on its own), and the table's descriptors are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from gpu_emu_runner import EmulatedAesGcm, GuardedBuffer, build_emulator, cxx_compiler
from gpu_vectors import DECRYPT_VECTORS, ENCRYPT_VECTORS
from pipellm_client.gpu import DEFAULT_PARAMS, GcmParams
from pipellm_client.gpu.aesgcm_ref import AddressSpace, MemPtr, _Kernels
from pipellm_client.gpu.keyctx import build_context
from pipellm_client.gpu.params import FLAG_BAD, FLAG_OK, KERNEL_CTR_DECRYPT
from pipellm_client.gpu.plan import Buf, Plan, Ptr, decrypt_plan, encrypt_plan

pytestmark = pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler (g++/clang++) to build the emulator")

KIB = 1024
TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[GcmParams, Path]:
    out = tmp_path_factory.mktemp("aesgcm_emu")
    return {p: build_emulator(p, out) for p in (DEFAULT_PARAMS, TINY)}


def _rand(n: int) -> np.ndarray:
    return np.frombuffer(os.urandom(n), dtype=np.uint8)


SIZES = {
    DEFAULT_PARAMS: [
        0,
        1,
        15,
        16,
        17,
        127,
        128,
        129,
        16 * KIB + 1,
        32 * KIB - 1,
        32 * KIB,
        32 * KIB + 17,
        70_001,
    ],
    TINY: [0, 1, 17, 511, 512, 513, 1024 + 5, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, 200_000],
}


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_matches_cryptography(libs: dict[GcmParams, Path], params: GcmParams) -> None:
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[params], key, params)
    aead = AESGCM(key)
    for n in SIZES[params]:
        nonce, pt = os.urandom(12), _rand(n)
        expected = aead.encrypt(nonce, pt.tobytes(), None)
        assert emu.encrypt(nonce, pt).tobytes() == expected, n
        ok, out = emu.decrypt_into(nonce, np.frombuffer(expected, dtype=np.uint8), np.zeros(n, np.uint8))
        assert ok, n
        assert out.tobytes() == pt.tobytes(), n


def test_one_mib_default(libs: dict[GcmParams, Path]) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    pt = _rand((1 << 20) + 3)
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    emu = EmulatedAesGcm(libs[DEFAULT_PARAMS], key, DEFAULT_PARAMS)
    assert emu.encrypt(nonce, pt).tobytes() == expected
    ok, out = emu.decrypt_into(nonce, np.frombuffer(expected, dtype=np.uint8), np.zeros(pt.size, np.uint8))
    assert ok and out.tobytes() == pt.tobytes()


def test_nist_vectors(libs: dict[GcmParams, Path]) -> None:
    for vec in ENCRYPT_VECTORS:
        emu = EmulatedAesGcm(libs[DEFAULT_PARAMS], bytes.fromhex(vec.key), DEFAULT_PARAMS)
        pt = np.frombuffer(bytes.fromhex(vec.pt), dtype=np.uint8)
        assert emu.encrypt(bytes.fromhex(vec.iv), pt).tobytes().hex() == vec.ct + vec.tag, vec.name
    for vec in DECRYPT_VECTORS:
        emu = EmulatedAesGcm(libs[DEFAULT_PARAMS], bytes.fromhex(vec.key), DEFAULT_PARAMS)
        data = np.frombuffer(bytes.fromhex(vec.ct + vec.tag), dtype=np.uint8)
        sentinel = np.full(len(vec.ct) // 2, 0x3C, dtype=np.uint8)
        ok, out = emu.decrypt_into(bytes.fromhex(vec.iv), data, sentinel)
        assert ok == vec.valid, vec.name
        if vec.valid:
            assert out.tobytes().hex() == vec.pt, vec.name
        else:
            assert (out == 0x3C).all(), vec.name


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("where", ["first", "middle", "last_ct", "tag"])
def test_tamper_leaves_destination_untouched(libs: dict[GcmParams, Path], params: GcmParams, where: str) -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    n = 40_000 + 5
    sealed = bytearray(AESGCM(key).encrypt(nonce, os.urandom(n), None))
    pos = {"first": 0, "middle": n // 2, "last_ct": n - 1, "tag": n + 7}[where]
    sealed[pos] ^= 0x01
    emu = EmulatedAesGcm(libs[params], key, params)
    # The runner seeds the flag word with FLAG_OK: the GHASH kernel must clear it before the check.
    ok, out = emu.decrypt_into(nonce, np.frombuffer(bytes(sealed), dtype=np.uint8), np.full(n, 0x77, np.uint8))
    assert not ok
    assert (out == 0x77).all()


def test_in_place(libs: dict[GcmParams, Path]) -> None:
    params = TINY
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[params], key, params)
    sizes = [3000 + 9, 17, 4096]
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_rand(n) for n in sizes]
    bufs = [GuardedBuffer(np.concatenate([pt, np.zeros(16, np.uint8)])) for pt in pts]
    emu.run(encrypt_plan(sizes, params), nonces, bufs, list(bufs))  # src == dst, every message
    for buf, nonce, pt in zip(bufs, nonces, pts, strict=True):
        assert buf.view.tobytes() == AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    outs: list[GuardedBuffer | None] = [buf.prefix(n) for buf, n in zip(bufs, sizes, strict=True)]
    scratch = emu.run(decrypt_plan(sizes, params), nonces, bufs, outs)
    assert (scratch.view[: 4 * len(sizes)].view("<u4") == FLAG_OK).all()
    for buf, pt in zip(bufs, pts, strict=True):
        assert buf.view[: pt.size].tobytes() == pt.tobytes()


# -- batches ---------------------------------------------------------------------------------------

BATCH_SIZES = {
    DEFAULT_PARAMS: [0, 1, 15, 16, 17, 4096, 32 * KIB, 32 * KIB + 17, 70_001, 5],
    TINY: [0, 1, 17, 511, 512, 513, 3000, 64 * KIB + 1, 200_000, 16, 31],  # 1, 2 and 3 GHASH levels
}


def _sealed_batch(key: bytes, sizes: list[int]) -> tuple[list[bytes], list[np.ndarray], list[np.ndarray]]:
    aead = AESGCM(key)
    nonces = [os.urandom(12) for _ in sizes]
    pts = [_rand(n) for n in sizes]
    sealed = [
        np.frombuffer(aead.encrypt(nc, pt.tobytes(), None), dtype=np.uint8) for nc, pt in zip(nonces, pts, strict=True)
    ]
    return nonces, pts, sealed


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_batch_matches_cryptography(libs: dict[GcmParams, Path], params: GcmParams) -> None:
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[params], key, params)
    sizes = BATCH_SIZES[params]
    nonces, pts, sealed = _sealed_batch(key, sizes)
    got = emu.encrypt_batch(list(zip(nonces, pts, strict=True)))
    assert [g.tobytes() for g in got] == [x.tobytes() for x in sealed]
    # Verify-only messages (DISCARD) in between: authenticated, never written.
    verify_only = {1, 4}
    items = [(nc, ct, None if i in verify_only else np.full(ct.size - 16, 0x6B, np.uint8))
             for i, (nc, ct) in enumerate(zip(nonces, sealed, strict=True))]  # fmt: skip
    oks, outs = emu.decrypt_batch(items)
    assert oks == [True] * len(sizes)
    for i, (out, pt) in enumerate(zip(outs, pts, strict=True)):
        if i in verify_only:
            assert out is None
        else:
            assert out is not None and out.tobytes() == pt.tobytes(), sizes[i]


def test_batch_of_one_mib_messages(libs: dict[GcmParams, Path]) -> None:
    """The project's chunk size with the production parameters, plus sizes that are not whole blocks."""
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[DEFAULT_PARAMS], key, DEFAULT_PARAMS)
    sizes = [1 << 20, (1 << 20) - 3, 33]
    nonces, pts, sealed = _sealed_batch(key, sizes)
    assert [g.tobytes() for g in emu.encrypt_batch(list(zip(nonces, pts, strict=True)))] == [
        x.tobytes() for x in sealed
    ]
    oks, outs = emu.decrypt_batch(
        [(nc, ct, np.zeros(ct.size - 16, np.uint8)) for nc, ct in zip(nonces, sealed, strict=True)]
    )
    assert oks == [True] * 3
    assert all(o is not None and o.tobytes() == pt.tobytes() for o, pt in zip(outs, pts, strict=True))


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("where", ["first", "middle_ct", "middle_tag", "last"])
def test_batch_tag_failure_leaves_every_destination_untouched(
    libs: dict[GcmParams, Path], params: GcmParams, where: str
) -> None:
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[params], key, params)
    sizes = [4096, 70_001, 17, 40_005, 3000, 1, 20_000]
    nonces, _, sealed = _sealed_batch(key, sizes)
    bad_index, pos = {"first": (0, 5), "middle_ct": (3, 40_004), "middle_tag": (3, 40_005 + 9), "last": (6, 0)}[where]
    tampered = [x.copy() for x in sealed]
    tampered[bad_index][pos] ^= 0x10
    sentinels = [np.full(n, 0x40 + i, np.uint8) for i, n in enumerate(sizes)]
    items = [(nc, ct, sent) for nc, ct, sent in zip(nonces, tampered, sentinels, strict=True)]
    oks, outs = emu.decrypt_batch(items)  # the runner seeds every flag with a stale FLAG_OK
    assert oks == [i != bad_index for i in range(len(sizes))], "each tag is checked on its own"
    for i, (out, sent) in enumerate(zip(outs, sentinels, strict=True)):
        assert out is not None and (out == sent).all(), f"destination {i} was written despite message {bad_index}"


def test_batch_gate_is_the_ctr_kernel(libs: dict[GcmParams, Path]) -> None:
    """Force every GHASH result aside and run only the CTR launch: with one flag not OK (of any
    value, stale or garbage) it writes nothing; with all OK it writes every message."""
    params = TINY
    key = os.urandom(32)
    emu = EmulatedAesGcm(libs[params], key, params)
    sizes = [100, 3000, 17, 512]
    nonces, pts, sealed = _sealed_batch(key, sizes)
    plan = decrypt_plan(sizes, params)
    ctr = [launch for launch in plan.launches if launch.kernel == KERNEL_CTR_DECRYPT]
    assert len(ctr) == 1
    for flags in ([FLAG_OK, FLAG_OK, FLAG_BAD, FLAG_OK], [FLAG_OK, 1, FLAG_OK, FLAG_OK], [FLAG_OK] * 4):
        srcs = [GuardedBuffer(x) for x in sealed]
        dsts = [GuardedBuffer(np.full(n, 0x33, np.uint8)) for n in sizes]
        scratch = emu.new_scratch(plan)
        table = plan.table(nonces, [b.address for b in srcs], [b.address for b in dsts])
        scratch.view[: plan.table_bytes] = table.view(np.uint8)
        scratch.view[: 4 * len(sizes)] = np.array(flags, dtype="<u4").view(np.uint8)
        emu.guarded = [*srcs, *dsts]
        emu.launch(ctr[0], {Buf.CTX: emu.ctx, Buf.SCRATCH: scratch})
        emu.guarded = []
        if all(f == FLAG_OK for f in flags):
            assert [d.view.tobytes() for d in dsts] == [pt.tobytes() for pt in pts]
        else:
            assert all((d.view == 0x33).all() for d in dsts), flags


def _step_both(
    plan: Plan,
    params: GcmParams,
    lib: Path,
    *,
    key: bytes,
    nonces: list[bytes],
    srcs: list[np.ndarray],
    dst_sizes: list[int | None],
) -> None:
    """Run each launch on the emulator and on the reference from identical buffers; after every
    launch the destinations, the flags and the GHASH partials must be byte-identical, and the rest
    of the table (descriptors, block starts) unchanged."""
    emu = EmulatedAesGcm(lib, key, params)
    scratch0 = np.random.default_rng().integers(0, 256, plan.scratch_bytes, dtype=np.uint8)
    e_src = [GuardedBuffer(s) for s in srcs]
    e_dst = [GuardedBuffer(np.zeros(n, np.uint8)) if n is not None else None for n in dst_sizes]
    e_scratch = GuardedBuffer(scratch0)
    e_table = plan.table(nonces, [b.address if b.view.size else 0 for b in e_src],
                         [b.address if b is not None and b.view.size else 0 for b in e_dst])  # fmt: skip
    e_scratch.view[: plan.table_bytes] = e_table.view(np.uint8)
    space = AddressSpace()
    r_src = [s.copy() for s in srcs]
    r_dst = [np.zeros(n, np.uint8) if n is not None else None for n in dst_sizes]
    r_table = plan.table(nonces, [space.add(s) for s in r_src], [space.add(d) if d is not None else 0 for d in r_dst])
    r_scratch = scratch0.copy()
    r_scratch[: plan.table_bytes] = r_table.view(np.uint8)
    r_mem = {Buf.CTX: build_context(key, params).view(np.uint8), Buf.SCRATCH: r_scratch}
    kernels = _Kernels(params, space).table()
    n = plan.n
    flags = slice(0, 4 * n)
    rest = slice(4 * n, plan.table_bytes)
    parts = slice(plan.partials_offset, plan.scratch_bytes)
    emu.guarded = [*e_src, *(d for d in e_dst if d is not None)]
    for i, launch in enumerate(plan.launches):
        emu.launch(launch, {Buf.CTX: emu.ctx, Buf.SCRATCH: e_scratch})
        args = [MemPtr(r_mem[a.buf], a.offset) if isinstance(a, Ptr) else a.value for a in launch.args]
        kernels[launch.kernel](launch.grid, *args)
        what = f"launch {i} ({launch.kernel})"
        assert e_scratch.view[flags].tobytes() == r_scratch[flags].tobytes(), f"{what}: flags differ"
        assert e_scratch.view[parts].tobytes() == r_scratch[parts].tobytes(), f"{what}: partials differ"
        assert e_scratch.view[rest].tobytes() == e_table.view(np.uint8)[4 * n :].tobytes(), f"{what}: table"
        assert r_scratch[rest].tobytes() == r_table.view(np.uint8)[4 * n :].tobytes(), f"{what}: ref table"
        for j, (e, r) in enumerate(zip(e_dst, r_dst, strict=True)):
            if e is not None and r is not None:
                assert e.view.tobytes() == r.tobytes(), f"{what}: destination {j} differs"
    emu.guarded = []


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_every_launch_matches_reference(libs: dict[GcmParams, Path], params: GcmParams) -> None:
    """Same GHASH partials, same flags, same output after each kernel: the mirror is exact, for one
    message and for a batch of messages with different tree depths, a verify-only one and a bad tag."""
    key = os.urandom(32)
    big = 16 * params.span(0) * params.span(1) + 7 if params is TINY else 70_001  # tiny: 3 levels
    lib = libs[params]
    for sizes in ([big], [big, 0, 33, 5000, 16]):
        nonces, pts, sealed = _sealed_batch(key, sizes)
        _step_both(encrypt_plan(sizes, params), params, lib, key=key, nonces=nonces, srcs=pts,
                   dst_sizes=[n + 16 for n in sizes])  # fmt: skip
        writes = [i != 3 for i in range(len(sizes))]
        dec = decrypt_plan(sizes, params, writes)
        dst_sizes: list[int | None] = [n if w else None for n, w in zip(sizes, writes, strict=True)]
        _step_both(dec, params, lib, key=key, nonces=nonces, srcs=sealed, dst_sizes=dst_sizes)
        bad = [x.copy() for x in sealed]
        bad[-1][3 % bad[-1].size] ^= 4
        _step_both(dec, params, lib, key=key, nonces=nonces, srcs=bad, dst_sizes=dst_sizes)
