"""Building blocks shared by the kernels and the reference: tables, key schedule, GF(2^128), plan."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from pipellm_client.gpu import GcmParams, keyctx
from pipellm_client.gpu import aesgcm_ref as ref
from pipellm_client.gpu.params import CTX_RK, CTX_SHOUP, DEFAULT_PARAMS, PW_ENTRY_WORDS
from pipellm_client.gpu.plan import decrypt_plan, encrypt_plan, ghash_levels

u128 = st.integers(min_value=0, max_value=(1 << 128) - 1)


def test_sbox_spot_values() -> None:
    s = keyctx.sbox()
    assert (s[0x00], s[0x01], s[0x53], s[0xFF]) == (0x63, 0x7C, 0xED, 0x16)
    assert sorted(s) == list(range(256))


def test_t0_layout_and_sbox_byte() -> None:
    t0 = keyctx.t0_table()
    s = keyctx.sbox()
    assert int(t0[0x00]) == 0xC66363A5  # OpenSSL Te0[0]
    for x in range(256):
        assert (int(t0[x]) >> 8) & 0xFF == s[x]  # the last round reads S from here
        assert (int(t0[x]) >> 16) & 0xFF == s[x]


def test_reduction_table_is_mbedtls_last4() -> None:
    last4 = [0x0000, 0x1C20, 0x3840, 0x2460, 0x7080, 0x6CA0, 0x48C0, 0x54E0,
             0xE100, 0xFD20, 0xD940, 0xC560, 0x9180, 0x8DA0, 0xA9C0, 0xB5E0]  # fmt: skip
    assert [int(r) >> 16 for r in keyctx.r_table()] == last4


def test_key_expansion_fips197_a3() -> None:
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    w = keyctx.expand_key(key)
    assert len(w) == 60
    assert w[8] == 0x9BA35411 and w[9] == 0x8E6925AF
    assert w[56:60] == [0xFE4890D1, 0xE6188D0B, 0x046DF344, 0x706C631E]


def test_expand_key_rejects_wrong_length() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        keyctx.expand_key(bytes(16))


def _aes_ref_blocks(key: bytes, blocks: list[bytes]) -> list[bytes]:
    ctx = keyctx.build_context(key, DEFAULT_PARAMS)
    words = [np.array([int.from_bytes(b[4 * i : 4 * i + 4], "big") for b in blocks], dtype=np.uint32) for i in range(4)]
    out = ref.aes256(ctx[:256], ctx[CTX_RK : CTX_RK + 60], words)
    return [b"".join(int(out[i][j]).to_bytes(4, "big") for i in range(4)) for j in range(len(blocks))]


def test_ttable_aes_fips197_c3() -> None:
    key = bytes(range(32))
    pt = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert _aes_ref_blocks(key, [pt]) == [bytes.fromhex("8ea2b7ca516745bfeafc49904b496089")]


def test_ttable_aes_matches_cryptography_ecb() -> None:
    key = os.urandom(32)
    blocks = [os.urandom(16) for _ in range(64)]
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    expected = enc.update(b"".join(blocks)) + enc.finalize()
    assert b"".join(_aes_ref_blocks(key, blocks)) == expected


@settings(max_examples=60, deadline=None)
@given(a=u128, b=u128)
def test_shoup_mul_matches_bitwise(a: int, b: int) -> None:
    assert keyctx.shoup_mul_int(a, keyctx.shoup_table(b)) == keyctx.gf_mul(a, b)
    table = np.array([keyctx.words128(e) for e in keyctx.shoup_table(b)], dtype=np.uint32)
    z = [np.array([w], dtype=np.uint32) for w in keyctx.words128(a)]
    got = ref.gf_mul_shoup(z, table, keyctx.r_table())
    assert keyctx.from_words128([int(w[0]) for w in got]) == keyctx.gf_mul(a, b)


@settings(max_examples=40, deadline=None)
@given(a=u128, p=u128)
def test_four_chain_bitwise_mul(a: int, p: int) -> None:
    entry = []
    v = p
    for _ in range(4):
        entry.append(keyctx.words128(v))
        for _ in range(32):
            v = keyctx.gf_mulx(v)
    e = np.array([entry], dtype=np.uint32)
    z = [np.array([w], dtype=np.uint32) for w in keyctx.words128(a)]
    got = ref.gf_mul_pw(z, e)
    assert keyctx.from_words128([int(w[0]) for w in got]) == keyctx.gf_mul(a, p)


def test_gf_identities() -> None:
    h = keyctx.hash_subkey(os.urandom(32))
    assert keyctx.gf_mul(h, keyctx.GF_ONE) == h
    assert keyctx.gf_pow(h, 5) == keyctx.gf_mul(keyctx.gf_mul(keyctx.gf_mul(h, h), keyctx.gf_mul(h, h)), h)


@pytest.mark.parametrize(
    "params",
    [DEFAULT_PARAMS, GcmParams(threads_per_block=32, ghash_run0=2, ghash_run=2, enc_group=1)],
)
def test_context_multipliers(params: GcmParams) -> None:
    key = os.urandom(32)
    ctx = keyctx.build_context(key, params)
    h = keyctx.hash_subkey(key)
    assert h == int.from_bytes(keyctx.aes_encrypt_block_ecb(key, bytes(16)), "big")
    qs = keyctx.level_multipliers(h, params)
    tpb = params.threads_per_block
    for level, q in enumerate(qs):
        base = CTX_SHOUP + 64 * level
        assert keyctx.from_words128(list(ctx[base + 32 : base + 36])) == q  # entry 8 is Q itself
        for t in (0, 1, tpb - 1):
            off = params.ctx_pw + params.pw_level_words * level + PW_ENTRY_WORDS * t
            p = keyctx.from_words128(list(ctx[off : off + 4]))
            assert p == keyctx.gf_pow(q, params.run_length(level) * (tpb - 1 - t))
    assert not ctx.flags.writeable


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        GcmParams(threads_per_block=100)
    with pytest.raises(ValueError, match="enc_group"):
        GcmParams(ghash_run0=6, enc_group=4)


@pytest.mark.parametrize("nblocks", [0, 1, 2047, 2048, 2049, 65536, 65537, 2048 * 1024 + 1, 1 << 24])
def test_ghash_levels_cover_the_message(nblocks: int) -> None:
    p = DEFAULT_PARAMS
    levels = ghash_levels(nblocks, p)
    assert levels[-1].grid == 1 and all(lv.grid > 1 for lv in levels[:-1])
    n = nblocks
    for lv in levels:
        assert lv.n_items == n
        assert lv.grid * p.span(lv.index) == n + lv.pad
        assert 0 <= lv.pad < p.span(lv.index) or (n == 0 and lv.pad == p.span(lv.index))
        n = lv.grid
    assert len(levels) <= p.max_levels


def test_256mib_plan_and_limits() -> None:
    plan = decrypt_plan(256 << 20, DEFAULT_PARAMS)
    assert [lv.grid for lv in plan.levels[0]] == [8192, 8, 1]
    assert DEFAULT_PARAMS.max_message_bytes >= 256 << 20
    with pytest.raises(ValueError, match="exceeds"):
        ghash_levels(DEFAULT_PARAMS.max_blocks + 1, DEFAULT_PARAMS)


def test_plan_shapes() -> None:
    empty = decrypt_plan(0, DEFAULT_PARAMS)
    assert [launch.kernel for launch in empty.launches] == ["plm_gcm_ghash_ct"]  # no CTR pass
    verify_only = decrypt_plan([1 << 20, 1 << 20], DEFAULT_PARAMS, [False, False])
    assert [launch.kernel for launch in verify_only.launches] == ["plm_gcm_ghash_ct", "plm_gcm_ghash_reduce"]
    one_mib = decrypt_plan(1 << 20, DEFAULT_PARAMS)
    assert [launch.kernel for launch in one_mib.launches] == [
        "plm_gcm_ghash_ct",
        "plm_gcm_ghash_reduce",
        "plm_gcm_ctr_decrypt",
    ]
    enc = encrypt_plan(1 << 20, DEFAULT_PARAMS)
    assert [launch.kernel for launch in enc.launches] == ["plm_gcm_encrypt", "plm_gcm_ghash_reduce"]
    with pytest.raises(ValueError, match="12 bytes"):
        encrypt_plan(16, DEFAULT_PARAMS).table([bytes(8)], [0], [0])
