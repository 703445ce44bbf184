"""aesgcm.cu itself, compiled as host C++ and run on the CPU (tests/gpu/emu), against
`cryptography` and launch by launch against the numpy reference.

This is how the kernel source is executed on machines without a GPU: every index, padding, byte
swap, tail mask, flag write and the launch plan are the real ones; only the CUDA built-ins are
re-implemented (cuda_emu.h).
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
from pipellm_client.gpu.aesgcm_ref import MemPtr, _Kernels
from pipellm_client.gpu.keyctx import build_context
from pipellm_client.gpu.params import FLAG_OK
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
    key, nonce = os.urandom(32), os.urandom(12)
    n = 3000 + 9
    pt = _rand(n)
    expected = AESGCM(key).encrypt(nonce, pt.tobytes(), None)
    emu = EmulatedAesGcm(libs[params], key, params)
    buf = GuardedBuffer(np.concatenate([pt, np.zeros(16, np.uint8)]))
    emu.run(encrypt_plan(n, nonce, params), buf, buf)  # src == dst
    assert buf.view.tobytes() == expected
    scratch = emu.run(decrypt_plan(n, nonce, params), buf, buf)
    assert int(scratch.view[:4].view("<u4")[0]) == FLAG_OK
    assert buf.view[:n].tobytes() == pt.tobytes()


def _step_both(plan: Plan, params: GcmParams, lib: Path, *, key: bytes, src: np.ndarray, dst_size: int) -> None:
    """Run each launch on the emulator and on the reference from identical buffers; after every
    launch the destination and the scratch (flag + GHASH partials) must be byte-identical."""
    emu = EmulatedAesGcm(lib, key, params)
    scratch0 = np.random.default_rng().integers(0, 256, plan.scratch_bytes, dtype=np.uint8)
    e_bufs = {
        Buf.CTX: emu.ctx,
        Buf.SRC: GuardedBuffer(src),
        Buf.DST: GuardedBuffer(np.zeros(dst_size, np.uint8)),
        Buf.SCRATCH: GuardedBuffer(scratch0),
    }
    r_mem = {
        Buf.CTX: build_context(key, params).view(np.uint8),
        Buf.SRC: src.copy(),
        Buf.DST: np.zeros(dst_size, np.uint8),
        Buf.SCRATCH: scratch0.copy(),
    }
    kernels = _Kernels(params).table()
    for i, launch in enumerate(plan.launches):
        emu.launch(launch, e_bufs)
        args = [MemPtr(r_mem[a.buf], a.offset) if isinstance(a, Ptr) else a.value for a in launch.args]
        kernels[launch.kernel](launch.grid, *args)
        for b in (Buf.DST, Buf.SCRATCH):
            assert e_bufs[b].view.tobytes() == r_mem[b].tobytes(), f"launch {i} ({launch.kernel}) differs in {b.value}"


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_every_launch_matches_reference(libs: dict[GcmParams, Path], params: GcmParams) -> None:
    """Same GHASH partials, same flag, same output after each kernel: the mirror is exact."""
    key, nonce = os.urandom(32), os.urandom(12)
    n = 16 * params.span(0) * params.span(1) + 7 if params is TINY else 70_001  # tiny: 3 levels
    pt = _rand(n)
    sealed = np.frombuffer(AESGCM(key).encrypt(nonce, pt.tobytes(), None), dtype=np.uint8)
    lib = libs[params]
    _step_both(encrypt_plan(n, nonce, params), params, lib, key=key, src=pt, dst_size=n + 16)
    _step_both(decrypt_plan(n, nonce, params), params, lib, key=key, src=sealed, dst_size=n)
    bad = sealed.copy()
    bad[3] ^= 4
    _step_both(decrypt_plan(n, nonce, params), params, lib, key=key, src=bad, dst_size=n)
