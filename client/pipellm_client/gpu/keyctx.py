"""Per-key tables for the GPU AES-GCM kernels, built once on the host.

This is the only implementation of the AES-256 key schedule, the T-table, the GHASH reduction table
and the GF(2^128) precomputation in the project's GPU path: the CUDA class uploads the array that
:func:`build_context` returns, and the numpy reference reads the very same array, so a wrong table
shows up in the reference's known-answer tests.

GF(2^128) elements are Python ints holding the 16 bytes big-endian: the most significant bit of the
int is the coefficient of x^0 (GCM's bit-reflected convention, NIST SP 800-38D).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .params import (
    CTX_R,
    CTX_RK,
    CTX_SHOUP,
    CTX_T0,
    KEY_BYTES,
    PW_ENTRY_WORDS,
    RK_WORDS,
    SHOUP_WORDS,
    GcmParams,
)

MASK32 = 0xFFFFFFFF
MASK128 = (1 << 128) - 1
GF_ONE = 1 << 127  # the field's 1 (x^0) in the reflected representation
_GF_R = 0xE1 << 120  # x^128 = x^7 + x^2 + x + 1, reflected


def _xtime(b: int) -> int:
    """Multiply a byte by x in AES's GF(2^8)."""
    b <<= 1
    return (b ^ 0x11B) if b & 0x100 else b


def _gf8_mul(a: int, b: int) -> int:
    """Multiply two bytes in AES's GF(2^8)."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = _xtime(a)
        b >>= 1
    return r


@lru_cache(maxsize=1)
def sbox() -> tuple[int, ...]:
    """The AES S-box, derived (inverse in GF(2^8) then the affine map) rather than typed in."""
    out = []
    for x in range(256):
        inv = 0
        if x:
            inv = next(y for y in range(1, 256) if _gf8_mul(x, y) == 1)
        s = inv
        for shift in range(1, 5):
            s ^= ((inv << shift) | (inv >> (8 - shift))) & 0xFF
        out.append(s ^ 0x63)
    return tuple(out)


@lru_cache(maxsize=1)
def t0_table() -> npt.NDArray[np.uint32]:
    """T0[x] = (2s, s, s, 3s) as a big-endian word, s = S[x]; T1..T3 are right-rotations by 8/16/24.

    The last AES round needs S[x] alone; it is byte 1 (or 2) of T0[x], so no separate S-box table.
    """
    table = np.zeros(256, dtype=np.uint32)
    for x, s in enumerate(sbox()):
        table[x] = (_xtime(s) << 24) | (s << 16) | (s << 8) | (_xtime(s) ^ s)
    table.setflags(write=False)
    return table


def _clmul4(r: int, c: int) -> int:
    """Carry-less product of a 4-bit value and a constant."""
    out = 0
    for bit in range(4):
        if (r >> bit) & 1:
            out ^= c << bit
    return out


@lru_cache(maxsize=1)
def r_table() -> npt.NDArray[np.uint32]:
    """GHASH 4-bit reduction table (mbedTLS's last4), already shifted into word 0's top 16 bits.

    Shifting a 128-bit accumulator right by 4 drops 4 bits; folding them back in is a XOR of
    clmul(rem, 0x1C20) into the top 16 bits.
    """
    table = np.array([_clmul4(r, 0x1C20) << 16 for r in range(16)], dtype=np.uint32)
    table.setflags(write=False)
    return table


def expand_key(key: bytes) -> list[int]:
    """AES-256 key schedule (FIPS-197 §5.2): 60 big-endian 32-bit words."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256 key must be {KEY_BYTES} bytes, got {len(key)}")
    s = sbox()
    words = [int.from_bytes(key[4 * i : 4 * i + 4], "big") for i in range(8)]
    rcon = 1
    for i in range(8, RK_WORDS):
        temp = words[i - 1]
        if i % 8 == 0:
            temp = ((temp << 8) | (temp >> 24)) & MASK32
            temp = _sub_word(temp, s) ^ (rcon << 24)
            rcon = _xtime(rcon)
        elif i % 8 == 4:
            temp = _sub_word(temp, s)
        words.append(words[i - 8] ^ temp)
    return words


def _sub_word(w: int, s: tuple[int, ...]) -> int:
    return (s[(w >> 24) & 0xFF] << 24) | (s[(w >> 16) & 0xFF] << 16) | (s[(w >> 8) & 0xFF] << 8) | s[w & 0xFF]


def gf_mulx(v: int) -> int:
    """Multiply by x: a right shift in the reflected representation, then reduce."""
    return (v >> 1) ^ _GF_R if v & 1 else v >> 1


def gf_mul(a: int, b: int) -> int:
    """GF(2^128) product, bit by bit as in SP 800-38D Algorithm 1 (slow but obviously right)."""
    z = 0
    v = b
    for i in range(128):
        if (a >> (127 - i)) & 1:
            z ^= v
        v = gf_mulx(v)
    return z


def gf_pow(a: int, e: int) -> int:
    """a^e by square and multiply."""
    result = GF_ONE
    while e:
        if e & 1:
            result = gf_mul(result, a)
        a = gf_mul(a, a)
        e >>= 1
    return result


def shoup_table(q: int) -> list[int]:
    """Shoup's 4-bit table of q: entry n is (the 4-bit polynomial n, MSB = x^0) times q."""
    table = [0] * 16
    table[8] = q
    table[4] = gf_mulx(q)
    table[2] = gf_mulx(table[4])
    table[1] = gf_mulx(table[2])
    for i in (2, 4, 8):
        for j in range(1, i):
            table[i + j] = table[i] ^ table[j]
    return table


def words128(v: int) -> tuple[int, int, int, int]:
    """A field element as 4 big-endian words, word 0 first (the kernels' register layout)."""
    return ((v >> 96) & MASK32, (v >> 64) & MASK32, (v >> 32) & MASK32, v & MASK32)


def from_words128(w: tuple[int, int, int, int] | list[int]) -> int:
    """Inverse of words128."""
    return (int(w[0]) << 96) | (int(w[1]) << 64) | (int(w[2]) << 32) | int(w[3])


def aes_encrypt_block_ecb(key: bytes, block: bytes) -> bytes:
    """One AES block through `cryptography` (used for H; ECB on a single block is what we want)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def hash_subkey(key: bytes) -> int:
    """H = E_K(0^128)."""
    return int.from_bytes(aes_encrypt_block_ecb(key, bytes(16)), "big")


def _mulx_pow(v: int, k: int) -> int:
    for _ in range(k):
        v = gf_mulx(v)
    return v


def level_multipliers(h: int, params: GcmParams) -> list[int]:
    """Q_L for each GHASH level: Q_0 = H, Q_{L+1} = Q_L^(span(L))."""
    qs = [h]
    for level in range(1, params.max_levels):
        qs.append(gf_pow(qs[-1], params.span(level - 1)))
    return qs


def build_context(key: bytes, params: GcmParams) -> npt.NDArray[np.uint32]:
    """The per-key uint32 array every kernel reads (layout in params.py).

    Holds T0, the reduction table, the round keys and, for each GHASH level L with multiplier Q_L:
    the Shoup table of Q_L (Horner steps) and, for thread t of a block, the combine multiplier
    P = Q_L^(run_L * (TPB - 1 - t)) stored as (P, P*x^32, P*x^64, P*x^96) so the kernel's bitwise
    multiply runs as four independent 32-step chains.
    """
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be bytes, got {type(key).__name__}")
    key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError(f"AES-256-GCM key must be {KEY_BYTES} bytes, got {len(key)}")
    ctx = np.zeros(params.ctx_words, dtype=np.uint32)
    ctx[CTX_T0 : CTX_T0 + 256] = t0_table()
    ctx[CTX_R : CTX_R + 16] = r_table()
    ctx[CTX_RK : CTX_RK + RK_WORDS] = expand_key(key)
    tpb = params.threads_per_block
    for level, q in enumerate(level_multipliers(hash_subkey(key), params)):
        base = CTX_SHOUP + SHOUP_WORDS * level
        for n, entry in enumerate(shoup_table(q)):
            ctx[base + 4 * n : base + 4 * n + 4] = words128(entry)
        step = gf_pow(q, params.run_length(level))
        step_table = shoup_table(step)
        pw_base = params.ctx_pw + params.pw_level_words * level
        power = GF_ONE  # Q^(run*i) for i = 0, 1, ...
        for i in range(tpb):
            t = tpb - 1 - i  # thread t multiplies by Q^(run * (TPB - 1 - t))
            entry_base = pw_base + PW_ENTRY_WORDS * t
            value = power
            for chain in range(4):
                ctx[entry_base + 4 * chain : entry_base + 4 * chain + 4] = words128(value)
                value = _mulx_pow(value, 32)
            power = shoup_mul_int(power, step_table)
    ctx.setflags(write=False)
    return ctx


def shoup_mul_int(y: int, table: list[int]) -> int:
    """y * q with q's Shoup table, nibble by nibble from the low end (same order as the kernel)."""
    r = r_table()
    z = 0
    for shift in range(0, 128, 4):
        rem = z & 0xF
        z = (z >> 4) ^ (int(r[rem]) << 96)
        z ^= table[(y >> shift) & 0xF]
    return z
