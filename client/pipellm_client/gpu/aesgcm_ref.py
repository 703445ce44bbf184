"""Numpy reference of the GPU AES-GCM kernels: the same algorithm, not just the same result.

Each ``k_*`` function below mirrors the kernel of the same name in ``aesgcm.cu`` step by step (same
T-table and last-round byte assembly, same Shoup table and nibble order, same per-thread run length,
same front padding, same combine multipliers, same finalisation and flag arithmetic), vectorised
with numpy across the threads of the whole grid. :class:`RefAesGcm` runs the very :class:`Plan`
that the CUDA class launches, so a mistake in the decomposition, the tables or the plan fails the
reference's known-answer and `cryptography` comparison tests on a machine without a GPU.

Only two things are not mirrored because they cannot change a result: the order in which XOR
reductions are combined (warp shuffles then shared memory on the GPU) and how AES blocks are
grouped for instruction-level parallelism.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import TagMismatch
from .keyctx import build_context
from .params import (
    CTX_R,
    CTX_RK,
    CTX_SHOUP,
    CTX_T0,
    DEFAULT_PARAMS,
    FLAG_BAD,
    FLAG_OK,
    KERNEL_CTR_DECRYPT,
    KERNEL_ENCRYPT,
    KERNEL_GHASH_CT,
    KERNEL_GHASH_REDUCE,
    MODE_DECRYPT,
    MODE_ENCRYPT,
    NONCE_BYTES,
    PW_ENTRY_WORDS,
    RK_WORDS,
    SHOUP_WORDS,
    TAG_BYTES,
    GcmParams,
)
from .plan import U32, U64, Buf, Plan, Ptr, decrypt_plan, encrypt_plan

U32Array = npt.NDArray[np.uint32]
U8Array = npt.NDArray[np.uint8]
Words = list[U32Array]  # a 128-bit value per thread as 4 big-endian words (the register layout)

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# Memory model: a pointer is (byte array, offset), like a device pointer into one allocation.


@dataclass
class MemPtr:
    """A byte pointer into one numpy buffer."""

    arr: U8Array
    offset: int

    def read(self, n: int, at: int = 0) -> U8Array:
        start = self.offset + at
        if start < 0 or start + n > self.arr.size:
            raise IndexError(f"read of {n} bytes at {start} outside a buffer of {self.arr.size}")
        return self.arr[start : start + n]

    def write(self, data: U8Array, at: int = 0) -> None:
        start = self.offset + at
        if start < 0 or start + data.size > self.arr.size:
            raise IndexError(f"write of {data.size} bytes at {start} outside {self.arr.size}")
        self.arr[start : start + data.size] = data

    def read_words(self, n: int) -> U32Array:
        return self.read(4 * n).view("<u4").astype(np.uint32)

    def write_words(self, words: U32Array) -> None:
        self.write(np.ascontiguousarray(words, dtype="<u4").view(np.uint8).ravel())


# ------------------------------------------------------------------------------------------------
# CUDA intrinsics, bit-exact


def byte_perm(x: U32Array, y: U32Array | int, sel: int) -> U32Array:
    """__byte_perm(x, y, s): result byte n = byte (s >> 4n) & 7 of the 8-byte value y:x."""
    x = np.asarray(x, dtype=np.uint32)
    y = np.asarray(y, dtype=np.uint32)
    out = np.zeros(np.broadcast(x, y).shape, dtype=np.uint32)
    for n in range(4):
        src = (sel >> (4 * n)) & 7
        word = x if src < 4 else y
        byte = (word >> np.uint32(8 * (src & 3))) & np.uint32(0xFF)
        out |= byte << np.uint32(8 * n)
    return out


def funnelshift_r(lo: U32Array, hi: U32Array, shift: int) -> U32Array:
    """__funnelshift_r(lo, hi, s): low 32 bits of (hi:lo) >> (s & 31)."""
    s = shift & 31
    if s == 0:
        return lo.copy()
    return (lo >> np.uint32(s)) | (hi << np.uint32(32 - s))


def bswap(x: U32Array) -> U32Array:
    """plm_bswap."""
    return byte_perm(x, 0, 0x0123)


def rotr(x: U32Array, n: int) -> U32Array:
    """plm_rotr."""
    return funnelshift_r(x, x, n)


def neg(x: U32Array) -> U32Array:
    """0u - x."""
    return (~x + np.uint32(1)).astype(np.uint32)


def tail_mask(tail: int, w: int) -> int:
    """plm_tail_mask."""
    lo = 4 * w
    if tail >= lo + 4:
        return M32
    if tail <= lo:
        return 0
    return (1 << (8 * (tail - lo))) - 1


# ------------------------------------------------------------------------------------------------
# Device functions


def sbox_word(ta: U32Array, tb: U32Array, tc: U32Array, td: U32Array) -> U32Array:
    """plm_sbox_word: S bytes from byte 2/1 of T0 entries."""
    hi = byte_perm(ta, tb, 0x2600)
    lo = byte_perm(tc, td, 0x0015)
    return byte_perm(hi, lo, 0x3254)


def aes256(t0: U32Array, rk: U32Array, s: Words) -> Words:
    """plm_aes256: the replicated shared table holds T0 in every lane's column, so tab[i] = T0[i]."""

    def t(i: U32Array) -> U32Array:
        return t0[i]

    ff = np.uint32(0xFF)
    s = [s[i] ^ rk[i] for i in range(4)]
    for r in range(1, 14):
        k = rk[4 * r : 4 * r + 4]
        a0, a1, a2, a3 = s
        s = [
            t(a0 >> np.uint32(24))
            ^ rotr(t((a1 >> np.uint32(16)) & ff), 8)
            ^ rotr(t((a2 >> np.uint32(8)) & ff), 16)
            ^ rotr(t(a3 & ff), 24)
            ^ k[0],
            t(a1 >> np.uint32(24))
            ^ rotr(t((a2 >> np.uint32(16)) & ff), 8)
            ^ rotr(t((a3 >> np.uint32(8)) & ff), 16)
            ^ rotr(t(a0 & ff), 24)
            ^ k[1],
            t(a2 >> np.uint32(24))
            ^ rotr(t((a3 >> np.uint32(16)) & ff), 8)
            ^ rotr(t((a0 >> np.uint32(8)) & ff), 16)
            ^ rotr(t(a1 & ff), 24)
            ^ k[2],
            t(a3 >> np.uint32(24))
            ^ rotr(t((a0 >> np.uint32(16)) & ff), 8)
            ^ rotr(t((a1 >> np.uint32(8)) & ff), 16)
            ^ rotr(t(a2 & ff), 24)
            ^ k[3],
        ]
    k = rk[56:60]
    a0, a1, a2, a3 = s
    return [
        sbox_word(t(a0 >> np.uint32(24)), t((a1 >> np.uint32(16)) & ff), t((a2 >> np.uint32(8)) & ff), t(a3 & ff))
        ^ k[0],
        sbox_word(t(a1 >> np.uint32(24)), t((a2 >> np.uint32(16)) & ff), t((a3 >> np.uint32(8)) & ff), t(a0 & ff))
        ^ k[1],
        sbox_word(t(a2 >> np.uint32(24)), t((a3 >> np.uint32(16)) & ff), t((a0 >> np.uint32(8)) & ff), t(a1 & ff))
        ^ k[2],
        sbox_word(t(a3 >> np.uint32(24)), t((a0 >> np.uint32(16)) & ff), t((a1 >> np.uint32(8)) & ff), t(a2 & ff))
        ^ k[3],
    ]


def aes_j0(ctx: U32Array, nw0: int, nw1: int, nw2: int) -> Words:
    """plm_aes_j0: E_K(nonce || 1)."""
    s = [np.array([v], dtype=np.uint32) for v in (nw0, nw1, nw2, 1)]
    return aes256(ctx[CTX_T0 : CTX_T0 + 256], ctx[CTX_RK : CTX_RK + RK_WORDS], s)


def gf_mul_shoup(z: Words, table: U32Array, r: U32Array) -> Words:
    """plm_gf_mul_shoup: z * Q with Q's Shoup table (16, 4); nibbles from the low end of w[3]."""
    x = z
    a0 = np.zeros_like(z[0])
    a1 = np.zeros_like(z[0])
    a2 = np.zeros_like(z[0])
    a3 = np.zeros_like(z[0])
    for w in (3, 2, 1, 0):
        xw = x[w]
        for sh in range(0, 32, 4):
            rem = a3 & np.uint32(0xF)
            a3 = funnelshift_r(a3, a2, 4)
            a2 = funnelshift_r(a2, a1, 4)
            a1 = funnelshift_r(a1, a0, 4)
            a0 = (a0 >> np.uint32(4)) ^ r[rem]
            e = table[(xw >> np.uint32(sh)) & np.uint32(0xF)]
            a0 = a0 ^ e[..., 0]
            a1 = a1 ^ e[..., 1]
            a2 = a2 ^ e[..., 2]
            a3 = a3 ^ e[..., 3]
    return [a0, a1, a2, a3]


def gf_mul_pw(z: Words, e: U32Array) -> Words:
    """plm_gf_mul_pw: z * P bit by bit, e[..., c, :] = P * x^(32 c), four independent chains."""
    v = [[e[:, c, i].copy() for i in range(4)] for c in range(4)]
    acc = [[np.zeros_like(z[0]) for _ in range(4)] for _ in range(4)]
    one = np.uint32(1)
    for j in range(32):
        for c in range(4):
            m = neg((z[c] >> np.uint32(31 - j)) & one)
            for i in range(4):
                acc[c][i] = acc[c][i] ^ (v[c][i] & m)
            carry = neg(v[c][3] & one)
            v[c][3] = funnelshift_r(v[c][3], v[c][2], 1)
            v[c][2] = funnelshift_r(v[c][2], v[c][1], 1)
            v[c][1] = funnelshift_r(v[c][1], v[c][0], 1)
            v[c][0] = (v[c][0] >> one) ^ (carry & np.uint32(0xE1000000))
    return [acc[0][i] ^ acc[1][i] ^ acc[2][i] ^ acc[3][i] for i in range(4)]


def shoup_table_at(ctx: U32Array, level: int) -> U32Array:
    """Level L's Shoup table from the context, shape (16, 4). (Shared memory holds 8 copies.)"""
    base = CTX_SHOUP + SHOUP_WORDS * level
    return ctx[base : base + SHOUP_WORDS].reshape(16, 4)


def finalize(
    ctx: U32Array,
    z: Words,
    *,
    msg_len: int,
    ek: Words,
    tag: MemPtr,
    flag: MemPtr | None,
    mode: int,
) -> None:
    """plm_finalize."""
    table = shoup_table_at(ctx, 0)
    r = ctx[CTX_R : CTX_R + 16]
    z = gf_mul_shoup(z, table, r)
    bits = msg_len * 8
    z[2] = z[2] ^ np.uint32((bits >> 32) & M32)
    z[3] = z[3] ^ np.uint32(bits & M32)
    z = gf_mul_shoup(z, table, r)
    diff = 0
    for i in range(16):
        byte = ((int(z[i >> 2][0]) ^ int(ek[i >> 2][0])) >> (24 - 8 * (i & 3))) & 0xFF
        if mode == MODE_ENCRYPT:
            tag.write(np.array([byte], dtype=np.uint8), at=i)
        else:
            diff |= byte ^ int(tag.read(1, at=i)[0])
    if mode == MODE_DECRYPT:
        assert flag is not None
        ok = ((diff - 1) & M32) >> 31
        flag.write_words(np.array([FLAG_OK & ((-ok) & M32)], dtype=np.uint32))


class _Kernels:
    """The four kernels, bound to one set of parameters."""

    def __init__(self, params: GcmParams) -> None:
        self.p = params

    def table(self) -> Mapping[str, Callable[..., None]]:
        return {
            KERNEL_GHASH_CT: self.k_ghash_ct,
            KERNEL_GHASH_REDUCE: self.k_ghash_reduce,
            KERNEL_CTR_DECRYPT: self.k_ctr_decrypt,
            KERNEL_ENCRYPT: self.k_encrypt,
        }

    # -- shared pieces ---------------------------------------------------------------------------

    def _load_run(self, src: MemPtr, nbytes: int, pad: int, n_threads: int, run: int) -> U32Array:
        """plm_load_block over every thread's run: LE words (threads, run, 4), zero front padding
        and a zero-padded partial last block."""
        buf = np.zeros(n_threads * run * 16, dtype=np.uint8)
        if nbytes:
            buf[pad * 16 : pad * 16 + nbytes] = src.read(nbytes)
        return buf.view("<u4").astype(np.uint32).reshape(n_threads, run, 4)

    def _block_end(
        self,
        grid: int,
        ctx: U32Array,
        level: int,
        y: Words,
        *,
        partials: MemPtr,
        msg_len: int,
        ek: Words | None,
        tag: MemPtr,
        flag: MemPtr | None,
        mode: int,
    ) -> None:
        """plm_ghash_block_end: combine multiplier per thread, XOR over the block, then store the
        partial or finalise."""
        tpb = self.p.threads_per_block
        base = self.p.ctx_pw + self.p.pw_level_words * level
        entries = ctx[base : base + self.p.pw_level_words].reshape(tpb, PW_ENTRY_WORDS // 4, 4)
        thread_in_block = np.arange(grid * tpb) % tpb
        y = gf_mul_pw(y, entries[thread_in_block])
        per_block = [np.bitwise_xor.reduce(y[i].reshape(grid, tpb), axis=1) for i in range(4)]
        if grid == 1:
            assert ek is not None
            z = [w[:1].copy() for w in per_block]
            finalize(ctx, z, msg_len=msg_len, ek=ek, tag=tag, flag=flag, mode=mode)
        else:
            partials.write_words(np.stack(per_block, axis=1).ravel())

    # -- kernels ---------------------------------------------------------------------------------

    # The k_* methods take the CUDA kernel's parameters positionally, in order, as a launch passes them.

    def k_ghash_ct(
        self,
        grid: int,
        ctx_p: MemPtr,
        ct: MemPtr,
        nbytes: int,
        pad: int,
        partials: MemPtr,
        nw0: int,
        nw1: int,
        nw2: int,
        tag: MemPtr,
        flag: MemPtr,
        mode: int,
    ) -> None:
        """plm_gcm_ghash_ct."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        if mode == MODE_DECRYPT:
            flag.write_words(np.array([FLAG_BAD], dtype=np.uint32))
        table = shoup_table_at(ctx, 0)
        r = ctx[CTX_R : CTX_R + 16]
        ek = aes_j0(ctx, nw0, nw1, nw2) if grid == 1 else None
        run = self.p.ghash_run0
        n_threads = grid * self.p.threads_per_block
        blk = self._load_run(ct, nbytes, pad, n_threads, run)
        y = [np.zeros(n_threads, dtype=np.uint32) for _ in range(4)]
        for j in range(run):
            y = gf_mul_shoup(y, table, r)
            y = [y[i] ^ bswap(blk[:, j, i]) for i in range(4)]
        self._block_end(grid, ctx, 0, y, partials=partials, msg_len=nbytes, ek=ek, tag=tag, flag=flag, mode=mode)

    def k_ghash_reduce(
        self,
        grid: int,
        ctx_p: MemPtr,
        items_p: MemPtr,
        n_items: int,
        pad: int,
        level: int,
        partials: MemPtr,
        msg_len: int,
        nw0: int,
        nw1: int,
        nw2: int,
        tag: MemPtr,
        flag: MemPtr,
        mode: int,
    ) -> None:
        """plm_gcm_ghash_reduce."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        table = shoup_table_at(ctx, level)
        r = ctx[CTX_R : CTX_R + 16]
        ek = aes_j0(ctx, nw0, nw1, nw2) if grid == 1 else None
        run = self.p.ghash_run
        n_threads = grid * self.p.threads_per_block
        flat = np.zeros((n_threads * run, 4), dtype=np.uint32)
        flat[pad : pad + n_items] = items_p.read_words(4 * n_items).reshape(n_items, 4)
        it = flat.reshape(n_threads, run, 4)
        y = [np.zeros(n_threads, dtype=np.uint32) for _ in range(4)]
        for j in range(run):
            y = gf_mul_shoup(y, table, r)
            y = [y[i] ^ it[:, j, i] for i in range(4)]
        self._block_end(grid, ctx, level, y, partials=partials, msg_len=msg_len, ek=ek, tag=tag, flag=flag, mode=mode)

    def k_ctr_decrypt(
        self,
        grid: int,
        ctx_p: MemPtr,
        ct: MemPtr,
        pt: MemPtr,
        nbytes: int,
        nw0: int,
        nw1: int,
        nw2: int,
        flag: MemPtr,
    ) -> None:
        """plm_gcm_ctr_decrypt: nothing is written unless the flag says OK."""
        if int(flag.read_words(1)[0]) != FLAG_OK:
            return
        ctx = ctx_p.read_words(self.p.ctx_words)
        nblk = (nbytes + 15) // 16
        n_threads = grid * self.p.threads_per_block
        bpt = self.p.ctr_blocks_per_thread
        k = np.arange(n_threads * bpt, dtype=np.uint64)  # thread g owns blocks [g bpt, (g+1) bpt)
        d = self._load_run(ct, nbytes, 0, n_threads, bpt).reshape(-1, 4)
        s = [
            np.full(k.size, nw0, dtype=np.uint32),
            np.full(k.size, nw1, dtype=np.uint32),
            np.full(k.size, nw2, dtype=np.uint32),
            ((k + np.uint64(2)) & np.uint64(M32)).astype(np.uint32),
        ]
        s = aes256(ctx[CTX_T0 : CTX_T0 + 256], ctx[CTX_RK : CTX_RK + RK_WORDS], s)
        c = np.stack([d[:, i] ^ bswap(s[i]) for i in range(4)], axis=1)[:nblk]
        pt.write(c.astype("<u4").view(np.uint8).ravel()[:nbytes])

    def k_encrypt(
        self,
        grid: int,
        ctx_p: MemPtr,
        pt: MemPtr,
        out: MemPtr,
        nbytes: int,
        pad: int,
        partials: MemPtr,
        nw0: int,
        nw1: int,
        nw2: int,
        tag: MemPtr,
    ) -> None:
        """plm_gcm_encrypt: CTR over each thread's front-padded GHASH run, then Horner on the
        ciphertext (partial block zero-masked)."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        table = shoup_table_at(ctx, 0)
        r = ctx[CTX_R : CTX_R + 16]
        ek = aes_j0(ctx, nw0, nw1, nw2) if grid == 1 else None
        run = self.p.ghash_run0
        n_threads = grid * self.p.threads_per_block
        nfull, tail = divmod(nbytes, 16)
        d = self._load_run(pt, nbytes, pad, n_threads, run)
        v = np.arange(n_threads * run, dtype=np.int64).reshape(n_threads, run)
        real = v >= pad
        k = v - pad  # real block index where real; the kernel's u64 wrap only feeds unused blocks
        ctr = ((k + 2) % (1 << 32)).astype(np.uint32)
        s = [
            np.full(v.size, nw0, dtype=np.uint32),
            np.full(v.size, nw1, dtype=np.uint32),
            np.full(v.size, nw2, dtype=np.uint32),
            ctr.ravel(),
        ]
        s = aes256(ctx[CTX_T0 : CTX_T0 + 256], ctx[CTX_RK : CTX_RK + RK_WORDS], s)
        c = np.stack([d.reshape(-1, 4)[:, i] ^ bswap(s[i]) for i in range(4)], axis=1)
        c = c.reshape(n_threads, run, 4)
        c[~real] = 0
        if nbytes:
            stored = c[real].astype("<u4").view(np.uint8).ravel()[:nbytes]
            out.write(stored)
        if tail:
            last = c[real][nfull]
            for w in range(4):
                last[w] &= np.uint32(tail_mask(tail, w))
            flat_index = pad + nfull  # virtual index of the partial block
            c[flat_index // run, flat_index % run] = last
        y = [np.zeros(n_threads, dtype=np.uint32) for _ in range(4)]
        for j in range(run):
            y = gf_mul_shoup(y, table, r)
            y = [y[i] ^ bswap(c[:, j, i]) for i in range(4)]
        self._block_end(
            grid, ctx, 0, y, partials=partials, msg_len=nbytes, ek=ek, tag=tag, flag=None, mode=MODE_ENCRYPT
        )


def run_plan(
    plan: Plan,
    kernels: Mapping[str, Callable[..., None]],
    resolve: Callable[[Ptr], Any],
) -> None:
    """Execute a plan's launches in order with the given kernel implementations."""
    for launch in plan.launches:
        args: list[Any] = []
        for arg in launch.args:
            if isinstance(arg, Ptr):
                args.append(resolve(arg))
            elif isinstance(arg, (U32, U64)):
                args.append(arg.value)
            else:  # pragma: no cover - Arg is a closed union
                raise TypeError(f"unknown kernel argument {arg!r}")
        kernels[launch.kernel](launch.grid, *args)


def _as_u8(data: Any, what: str) -> U8Array:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(data), dtype=np.uint8)
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{what} must be a numpy uint8 array or bytes, got {type(data).__name__}")
    if data.dtype != np.uint8:
        raise TypeError(f"{what} must have dtype uint8, got {data.dtype}")
    return np.ascontiguousarray(data).ravel()


def _check_nonce(nonce: bytes) -> bytes:
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError(f"nonce must be bytes, got {type(nonce).__name__}")
    nonce = bytes(nonce)
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    return nonce


class RefAesGcm:
    """AES-256-GCM (96-bit nonce, 128-bit tag, no AAD) computed exactly the way the GPU does it."""

    def __init__(self, key: bytes, params: GcmParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._ctx = build_context(key, params)
        self._kernels = _Kernels(params).table()

    def _run(self, plan: Plan, src: U8Array, dst: U8Array) -> U8Array:
        # Scratch starts as garbage, as cupy.empty would give: the kernels must not rely on zeros.
        rng = np.random.default_rng()
        scratch = rng.integers(0, 256, size=plan.scratch_bytes, dtype=np.uint8)
        scratch[:4] = np.array([FLAG_OK], dtype="<u4").view(np.uint8)  # worst case: stale OK
        mem = {
            Buf.CTX: self._ctx.view(np.uint8),
            Buf.SRC: src,
            Buf.DST: dst,
            Buf.SCRATCH: scratch,
        }
        run_plan(plan, self._kernels, lambda p: MemPtr(mem[p.buf], p.offset))
        return scratch

    def encrypt(self, nonce: bytes, plaintext: Any) -> U8Array:
        """Return ciphertext || tag (len(plaintext) + 16 bytes)."""
        nonce = _check_nonce(nonce)
        pt = _as_u8(plaintext, "plaintext")
        if pt.size > self.params.max_message_bytes:
            raise ValueError(f"plaintext of {pt.size} bytes exceeds {self.params.max_message_bytes}")
        out = np.zeros(pt.size + TAG_BYTES, dtype=np.uint8)
        self._run(encrypt_plan(pt.size, nonce, self.params), pt, out)
        return out

    def decrypt_into(self, nonce: bytes, data: Any, out: U8Array) -> bool:
        """Decrypt ciphertext || tag into `out`; False (and `out` untouched) if the tag is wrong."""
        nonce = _check_nonce(nonce)
        src = _as_u8(data, "data")
        if src.size < TAG_BYTES:
            raise ValueError(f"data must hold at least the {TAG_BYTES}-byte tag, got {src.size}")
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
            raise TypeError("out must be a 1-D numpy uint8 array")
        if out.size != src.size - TAG_BYTES:
            raise ValueError(f"out must have {src.size - TAG_BYTES} bytes, got {out.size}")
        ct_len = src.size - TAG_BYTES
        if ct_len > self.params.max_message_bytes:
            raise ValueError(f"ciphertext of {ct_len} bytes exceeds {self.params.max_message_bytes}")
        scratch = self._run(decrypt_plan(ct_len, nonce, self.params), src, out)
        return int(scratch[:4].view("<u4")[0]) == FLAG_OK

    def decrypt(self, nonce: bytes, data: Any) -> U8Array:
        """Return the plaintext of ciphertext || tag; raise TagMismatch if it does not authenticate."""
        src = _as_u8(data, "data")
        out = np.zeros(max(src.size - TAG_BYTES, 0), dtype=np.uint8)
        if not self.decrypt_into(nonce, src, out):
            raise TagMismatch("AES-GCM tag mismatch: ciphertext or tag was modified, or wrong key/nonce")
        return out
