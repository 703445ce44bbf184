"""Numpy reference of the GPU AES-GCM kernels: the same algorithm, not just the same result.

Each ``k_*`` function below mirrors the kernel of the same name in ``aesgcm.cu`` step by step (same
batch table, same block-to-message search, same T-table and last-round byte assembly, same Shoup
table and nibble order, same per-thread run length, same front padding, same combine multipliers,
same finalisation, flag arithmetic and batch gate), vectorised with numpy across the threads of each
message's blocks. :class:`RefAesGcm` runs the very :class:`Plan` that the CUDA class launches, batch
table included, with the table's device addresses resolved in an :class:`AddressSpace` of numpy
buffers, so a mistake in the decomposition, the tables or the plan fails the reference's
known-answer and `cryptography` comparison tests on a machine without a GPU.

Only three things are not mirrored because they cannot change a result: the order in which XOR
reductions are combined (warp shuffles then shared memory on the GPU), how AES blocks are grouped
for instruction-level parallelism, and the order in which the blocks of one launch run (each block
writes only its own message's partial, flag or bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
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
    FLAG_OK,
    KERNEL_CTR_DECRYPT,
    KERNEL_ENCRYPT,
    KERNEL_GHASH_CT,
    KERNEL_GHASH_REDUCE,
    MODE_DECRYPT,
    MODE_ENCRYPT,
    MSG_DST,
    MSG_LEVELS,
    MSG_NBYTES,
    MSG_NONCE,
    MSG_SRC,
    PW_ENTRY_WORDS,
    RK_WORDS,
    SHOUP_WORDS,
    TAG_BYTES,
    GcmParams,
)
from .plan import U32, U64, Buf, Plan, Ptr, check_nonce, decrypt_plan, encrypt_plan

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

    def at(self, nbytes: int) -> MemPtr:
        """This pointer plus `nbytes` (pointer arithmetic)."""
        return MemPtr(self.arr, self.offset + nbytes)


@dataclass
class AddressSpace:
    """Device addresses of numpy buffers: what the table's u64 pointers mean to the reference.

    Buffers keep their real host addresses, so a table built for the reference is the table the
    emulated kernels would get for the same buffers.
    """

    buffers: list[U8Array] = field(default_factory=list)

    def add(self, arr: U8Array) -> int:
        """Register a 1-D uint8 buffer; returns its address."""
        if arr.ndim != 1 or arr.dtype != np.uint8:
            raise TypeError("device buffers are 1-D uint8 arrays")
        self.buffers.append(arr)
        return int(arr.ctypes.data) if arr.size else 0

    def ptr(self, address: int) -> MemPtr:
        """The buffer and offset an address points into (one past the end is allowed; 0, the
        address of an empty buffer, points to nothing)."""
        if address == 0:
            return MemPtr(np.zeros(0, dtype=np.uint8), 0)
        for inclusive in (False, True):
            for arr in self.buffers:
                base = int(arr.ctypes.data)
                if arr.size and base <= address < base + arr.size + int(inclusive):
                    return MemPtr(arr, address - base)
        raise IndexError(f"address 0x{address:x} is in no device buffer")


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

    def column(a: Words, i: int) -> tuple[U32Array, U32Array, U32Array, U32Array]:
        """Output column i's four table lookups: byte 3 of word i, 2 of i+1, 1 of i+2, 0 of i+3 (ShiftRows)."""
        return (
            t(a[i] >> np.uint32(24)),
            t((a[(i + 1) % 4] >> np.uint32(16)) & ff),
            t((a[(i + 2) % 4] >> np.uint32(8)) & ff),
            t(a[(i + 3) % 4] & ff),
        )

    s = [s[i] ^ rk[i] for i in range(4)]
    for r in range(1, 14):
        k = rk[4 * r : 4 * r + 4]
        cols = [column(s, i) for i in range(4)]
        s = [c0 ^ rotr(c1, 8) ^ rotr(c2, 16) ^ rotr(c3, 24) ^ k[i] for i, (c0, c1, c2, c3) in enumerate(cols)]
    k = rk[56:60]
    return [sbox_word(*column(s, i)) ^ k[i] for i in range(4)]


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
    """The four kernels, bound to one set of parameters and one address space."""

    def __init__(self, params: GcmParams, space: AddressSpace | None = None) -> None:
        self.p = params
        self.space = space if space is not None else AddressSpace()

    def table(self) -> Mapping[str, Callable[..., None]]:
        return {
            KERNEL_GHASH_CT: self.k_ghash_ct,
            KERNEL_GHASH_REDUCE: self.k_ghash_reduce,
            KERNEL_CTR_DECRYPT: self.k_ctr_decrypt,
            KERNEL_ENCRYPT: self.k_encrypt,
        }

    # -- the batch table ------------------------------------------------------------------------

    def _jobs(self, tab: MemPtr, n: int, grid: int, k: int) -> list[_Job]:
        """plm_job_of for every block of a launch, grouped by message: each message's blocks are
        one contiguous range (in block order, as the search assigns them)."""
        p = self.p
        words = tab.read_words(p.tab_words(n))
        starts = words[p.tab_starts(n) :].reshape(p.max_levels + 1, n + 1).astype(np.int64)
        blocks = np.arange(grid, dtype=np.int64)
        found = np.searchsorted(starts[k, :n], blocks, side="right") - 1  # plm_find: last m with start <= b
        jobs = []
        for found_m in np.unique(found):
            m = int(found_m)
            lb = blocks[found == m] - starts[k, m]
            g = int(starts[k, m + 1] - starts[k, m])
            assert lb.size == g and int(lb[0]) == 0, "a message's blocks are one range"
            prev = int(starts[k - 1, m + 1] - starts[k - 1, m]) if 1 <= k < p.max_levels else 0
            base = p.tab_msgs(n) + m * p.msg_words
            jobs.append(_Job(m, g, prev, words[base : base + p.msg_words]))
        return jobs

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
        """plm_ghash_block_end over one message's `grid` blocks: combine multiplier per thread, XOR
        over each block, then store the partials or (grid == 1: the final level) finalise."""
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

    def k_ghash_ct(self, grid: int, ctx_p: MemPtr, tab: MemPtr, n: int, partials: MemPtr) -> None:
        """plm_gcm_ghash_ct."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        table = shoup_table_at(ctx, 0)
        r = ctx[CTX_R : CTX_R + 16]
        run = self.p.ghash_run0
        for job in self._jobs(tab, n, grid, 0):
            ct = self.space.ptr(job.src)
            ek = aes_j0(ctx, *job.nonce) if job.grid == 1 else None
            n_threads = job.grid * self.p.threads_per_block
            blk = self._load_run(ct, job.nbytes, job.pad(0), n_threads, run)
            y = [np.zeros(n_threads, dtype=np.uint32) for _ in range(4)]
            for j in range(run):
                y = gf_mul_shoup(y, table, r)
                y = [y[i] ^ bswap(blk[:, j, i]) for i in range(4)]
            self._block_end(
                job.grid, ctx, 0, y, partials=partials.at(16 * job.part(0)), msg_len=job.nbytes, ek=ek,
                tag=ct.at(job.nbytes), flag=tab.at(4 * job.m), mode=MODE_DECRYPT,
            )  # fmt: skip

    def k_ghash_reduce(
        self, grid: int, ctx_p: MemPtr, tab: MemPtr, n: int, partials: MemPtr, level: int, mode: int
    ) -> None:
        """plm_gcm_ghash_reduce."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        table = shoup_table_at(ctx, level)
        r = ctx[CTX_R : CTX_R + 16]
        run = self.p.ghash_run
        for job in self._jobs(tab, n, grid, level):
            ek = aes_j0(ctx, *job.nonce) if job.grid == 1 else None
            n_threads = job.grid * self.p.threads_per_block
            pad, n_items = job.pad(level), job.prev
            flat = np.zeros((n_threads * run, 4), dtype=np.uint32)
            flat[pad : pad + n_items] = partials.at(16 * job.part(level - 1)).read_words(4 * n_items).reshape(-1, 4)
            it = flat.reshape(n_threads, run, 4)
            y = [np.zeros(n_threads, dtype=np.uint32) for _ in range(4)]
            for j in range(run):
                y = gf_mul_shoup(y, table, r)
                y = [y[i] ^ it[:, j, i] for i in range(4)]
            tag = self.space.ptr(job.dst if mode == MODE_ENCRYPT else job.src).at(job.nbytes)
            self._block_end(
                job.grid, ctx, level, y, partials=partials.at(16 * job.part(level)), msg_len=job.nbytes, ek=ek,
                tag=tag, flag=tab.at(4 * job.m), mode=mode,
            )  # fmt: skip

    def k_ctr_decrypt(self, grid: int, ctx_p: MemPtr, tab: MemPtr, n: int) -> None:
        """plm_gcm_ctr_decrypt: nothing is written unless every flag of the batch says OK."""
        if (tab.read_words(n) != FLAG_OK).any():  # the batch gate (__syncthreads_or in every block)
            return
        ctx = ctx_p.read_words(self.p.ctx_words)
        bpt = self.p.ctr_blocks_per_thread
        for job in self._jobs(tab, n, grid, self.p.max_levels):
            ct, pt = self.space.ptr(job.src), self.space.ptr(job.dst)
            nw0, nw1, nw2 = job.nonce
            nbytes = job.nbytes
            nblk = (nbytes + 15) // 16
            n_threads = job.grid * self.p.threads_per_block
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

    def k_encrypt(self, grid: int, ctx_p: MemPtr, tab: MemPtr, n: int, partials: MemPtr) -> None:
        """plm_gcm_encrypt: CTR over each thread's front-padded GHASH run, then Horner on the
        ciphertext (partial block zero-masked)."""
        ctx = ctx_p.read_words(self.p.ctx_words)
        table = shoup_table_at(ctx, 0)
        r = ctx[CTX_R : CTX_R + 16]
        run = self.p.ghash_run0
        for job in self._jobs(tab, n, grid, 0):
            pt, out = self.space.ptr(job.src), self.space.ptr(job.dst)
            nbytes, pad = job.nbytes, job.pad(0)
            nw0, nw1, nw2 = job.nonce
            ek = aes_j0(ctx, nw0, nw1, nw2) if job.grid == 1 else None
            n_threads = job.grid * self.p.threads_per_block
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
                out.write(c[real].astype("<u4").view(np.uint8).ravel()[:nbytes])
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
                job.grid, ctx, 0, y, partials=partials.at(16 * job.part(0)), msg_len=nbytes, ek=ek,
                tag=out.at(nbytes), flag=None, mode=MODE_ENCRYPT,
            )  # fmt: skip


@dataclass(frozen=True)
class _Job:
    """plm_job plus the message's descriptor words."""

    m: int
    grid: int
    prev: int
    desc: U32Array

    def _u64(self, at: int) -> int:
        return int(self.desc[at]) | (int(self.desc[at + 1]) << 32)

    @property
    def src(self) -> int:
        return self._u64(MSG_SRC)

    @property
    def dst(self) -> int:
        return self._u64(MSG_DST)

    @property
    def nbytes(self) -> int:
        return self._u64(MSG_NBYTES)

    @property
    def nonce(self) -> tuple[int, int, int]:
        return (int(self.desc[MSG_NONCE]), int(self.desc[MSG_NONCE + 1]), int(self.desc[MSG_NONCE + 2]))

    def pad(self, level: int) -> int:
        return int(self.desc[MSG_LEVELS + 2 * level])

    def part(self, level: int) -> int:
        return int(self.desc[MSG_LEVELS + 2 * level + 1])


def run_plan(
    plan: Plan,
    kernels: Mapping[str, Callable[..., None]],
    resolve: Callable[[Ptr], Any],
) -> None:
    """Execute a plan's launches in order with the given kernel implementations (the table must
    already be in scratch)."""
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


def _device_copy(a: U8Array) -> U8Array:
    """A private, 16-byte aligned copy (as device memory would be; the kernels use uint4 access)."""
    raw = np.empty(a.size + 16, dtype=np.uint8)
    start = (-raw.ctypes.data) % 16
    out = raw[start : start + a.size]
    out[:] = a
    return out


class RefAesGcm:
    """AES-256-GCM (96-bit nonce, 128-bit tag, no AAD) computed exactly the way the GPU does it."""

    def __init__(self, key: bytes, params: GcmParams = DEFAULT_PARAMS) -> None:
        self.params = params
        self._ctx = build_context(key, params)

    def run(
        self, plan: Plan, nonces: Sequence[bytes], srcs: Sequence[U8Array], dsts: Sequence[U8Array | None]
    ) -> U8Array:
        """Execute a batch plan over numpy buffers (None: no destination); returns the scratch."""
        space = AddressSpace()
        src_addr = [space.add(s) for s in srcs]
        dst_addr = [space.add(d) if d is not None else 0 for d in dsts]
        table = plan.table(nonces, src_addr, dst_addr)
        # Scratch starts as garbage with stale OK flags, as cupy.empty might give: the table copy
        # must reset them and the kernels must not rely on zeros.
        scratch = np.random.default_rng().integers(0, 256, size=plan.scratch_bytes, dtype=np.uint8)
        scratch[: 4 * plan.n] = np.full(plan.n, FLAG_OK, dtype="<u4").view(np.uint8)
        scratch[: plan.table_bytes] = table.view(np.uint8)  # the upload
        mem = {Buf.CTX: self._ctx.view(np.uint8), Buf.SCRATCH: scratch}
        run_plan(plan, _Kernels(self.params, space).table(), lambda p: MemPtr(mem[p.buf], p.offset))
        return scratch

    def _check_sizes(self, n: int, what: str) -> None:
        if n > self.params.max_message_bytes:
            raise ValueError(f"{what} of {n} bytes exceeds {self.params.max_message_bytes}")

    def encrypt_batch(self, items: Sequence[tuple[bytes, Any]]) -> list[U8Array]:
        """Encrypt (nonce, plaintext) pairs in one batch; returns each ciphertext || tag."""
        nonces = [check_nonce(nonce) for nonce, _ in items]
        pts = [_device_copy(_as_u8(pt, "plaintext")) for _, pt in items]
        for pt in pts:
            self._check_sizes(pt.size, "plaintext")
        outs = [_device_copy(np.zeros(pt.size + TAG_BYTES, dtype=np.uint8)) for pt in pts]
        self.run(encrypt_plan([pt.size for pt in pts], self.params), nonces, pts, outs)
        return [o.copy() for o in outs]

    def decrypt_batch_into(self, items: Sequence[tuple[bytes, Any, U8Array | None]]) -> list[bool]:
        """Decrypt (nonce, ciphertext || tag, out) triples as one batch (out None: verify only).

        Returns each message's tag result. Unless every tag matched, no `out` is written at all.
        """
        nonces, srcs, outs = [], [], []
        for nonce, data, out in items:
            nonces.append(check_nonce(nonce))
            src = _as_u8(data, "data")
            if src.size < TAG_BYTES:
                raise ValueError(f"data must hold at least the {TAG_BYTES}-byte tag, got {src.size}")
            ct_len = src.size - TAG_BYTES
            self._check_sizes(ct_len, "ciphertext")
            if out is not None:
                if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
                    raise TypeError("out must be a 1-D numpy uint8 array")
                if out.size != ct_len:
                    raise ValueError(f"out must have {ct_len} bytes, got {out.size}")
            srcs.append(_device_copy(src))
            outs.append(None if out is None else _device_copy(np.zeros(ct_len, dtype=np.uint8)))
        plan = decrypt_plan([s.size - TAG_BYTES for s in srcs], self.params, [o is not None for o in outs])
        scratch = self.run(plan, nonces, srcs, outs)
        flags = scratch[: 4 * plan.n].view("<u4")
        oks = [int(f) == FLAG_OK for f in flags]
        if all(oks):  # the device buffers were written; hand the plaintext over
            for (_, _, out), dev in zip(items, outs, strict=True):
                if out is not None and dev is not None:
                    out[:] = dev
        else:
            for dev in outs:
                assert dev is None or not dev.any(), "the batch gate let a CTR write through"
        return oks

    def encrypt(self, nonce: bytes, plaintext: Any) -> U8Array:
        """Return ciphertext || tag (len(plaintext) + 16 bytes)."""
        return self.encrypt_batch([(nonce, plaintext)])[0]

    def decrypt_into(self, nonce: bytes, data: Any, out: U8Array) -> bool:
        """Decrypt ciphertext || tag into `out`; False (and `out` untouched) if the tag is wrong."""
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 1:
            raise TypeError("out must be a 1-D numpy uint8 array")
        return self.decrypt_batch_into([(nonce, data, out)])[0]

    def decrypt(self, nonce: bytes, data: Any) -> U8Array:
        """Return the plaintext of ciphertext || tag; raise TagMismatch if it does not authenticate."""
        src = _as_u8(data, "data")
        out = np.zeros(max(src.size - TAG_BYTES, 0), dtype=np.uint8)
        if not self.decrypt_into(nonce, src, out):
            raise TagMismatch("AES-GCM tag mismatch: ciphertext or tag was modified, or wrong key/nonce")
        return out
