"""The launch sequence for a batch of AES-GCM messages, as data.

The CUDA class, the numpy reference and the test-only CPU emulation of the kernels all execute the
same :class:`Plan`, so the sequence of launches, grid sizes, paddings, scratch offsets and the batch
table are written once. Pointers in launches are symbolic (which buffer, byte offset); each executor
resolves them. Per-message pointers (sources, destinations) are raw device addresses in the table.

A plan covers n >= 1 messages, each with its own length, nonce and buffers, and costs a fixed
number of launches whatever n is:

* decrypt: ``plm_gcm_ghash_ct`` (GHASH level 0 of every message), one ``plm_gcm_ghash_reduce`` per
  further level that any message needs (at most ``max_levels - 1``; each message's final level
  compares its tag and writes its flag), then one ``plm_gcm_ctr_decrypt`` that writes plaintext only
  if every flag of the batch is OK. A tag failure anywhere therefore leaves every destination of the
  batch untouched.
* encrypt: ``plm_gcm_encrypt`` (fused CTR + GHASH level 0), then the reduction levels; each message's
  final level writes its tag after its ciphertext.

Before the first launch the executor copies the table (:meth:`Plan.table`) to the start of the
scratch buffer; that copy also sets every flag to FLAG_BAD, so no stale OK can survive.

GHASH decomposition (levels), per message: level 0 folds the message's blocks, level L >= 1 folds the
partials of level L-1. At level L a thread folds ``run_length(L)`` consecutive items by Horner
(Y = Y*Q_L ^ item), a CUDA block combines its threads' Y with multipliers Q_L^(run*(TPB-1-t)) and
XORs them into one partial per block. The items are front-padded with zero items up to a whole
number of blocks (leading zeros leave a Horner sum unchanged), so every multiplier is a power of
Q_L^run. The level whose grid is 1 is that message's final one: it finishes GHASH with the length
block and XORs E_K(J0). In a batch launch each message owns a contiguous range of CUDA blocks (the
table's block starts), and a block finds its message by binary search.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from .params import (
    AES_BLOCK,
    FLAG_BAD,
    KERNEL_CTR_DECRYPT,
    KERNEL_ENCRYPT,
    KERNEL_GHASH_CT,
    KERNEL_GHASH_REDUCE,
    MAX_BATCH,
    MODE_DECRYPT,
    MODE_ENCRYPT,
    MSG_DST,
    MSG_LEVELS,
    MSG_NBYTES,
    MSG_NONCE,
    MSG_SRC,
    NONCE_BYTES,
    GcmParams,
)

U32Array = npt.NDArray[np.uint32]


class Buf(Enum):
    """Buffers a launch refers to."""

    CTX = "ctx"  # the per-key context (uint32 words)
    SCRATCH = "scratch"  # the batch table (flags first), then the GHASH partials


@dataclass(frozen=True)
class Ptr:
    """A device pointer: buffer plus byte offset."""

    buf: Buf
    offset: int = 0


@dataclass(frozen=True)
class U32:
    """A 32-bit unsigned kernel argument."""

    value: int


@dataclass(frozen=True)
class U64:
    """A 64-bit unsigned kernel argument."""

    value: int


Arg = Ptr | U32 | U64


@dataclass(frozen=True)
class Launch:
    """One kernel launch: 1-D grid of `grid` blocks of `threads_per_block` threads."""

    kernel: str
    grid: int
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Level:
    """One GHASH level of one message: fold n_items into `grid` partials (grid == 1: final)."""

    index: int
    n_items: int
    run: int
    grid: int
    pad: int

    @property
    def final(self) -> bool:
        return self.grid == 1


def nonce_words(nonce: bytes) -> tuple[int, int, int]:
    """The 96-bit nonce as the first three big-endian words of every counter block."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
    return (
        int.from_bytes(nonce[0:4], "big"),
        int.from_bytes(nonce[4:8], "big"),
        int.from_bytes(nonce[8:12], "big"),
    )


def n_blocks(nbytes: int) -> int:
    """16-byte blocks of a message, the last one possibly partial."""
    return (nbytes + AES_BLOCK - 1) // AES_BLOCK


@lru_cache(maxsize=1024)
def ghash_levels(nblocks: int, params: GcmParams) -> tuple[Level, ...]:
    """The GHASH reduction levels for a message of `nblocks` blocks (0 is allowed). Memoised:
    messages mostly come in a few sizes (1 MiB chunks) and this runs on every call."""
    if nblocks > params.max_blocks:
        raise ValueError(f"message of {nblocks} blocks exceeds the supported maximum of {params.max_blocks}")
    levels: list[Level] = []
    n = nblocks
    while True:
        index = len(levels)
        run = params.run_length(index)
        span = run * params.threads_per_block
        grid = max(1, -(-n // span))
        levels.append(Level(index=index, n_items=n, run=run, grid=grid, pad=grid * span - n))
        if grid == 1:
            break
        n = grid
    if len(levels) > params.max_levels:  # cannot happen below max_blocks; kept as a guard
        raise ValueError(f"message needs {len(levels)} GHASH levels, max is {params.max_levels}")
    return tuple(levels)


def ctr_grid(nbytes: int, params: GcmParams) -> int:
    """CUDA blocks of the CTR pass for one message."""
    per_block = params.threads_per_block * params.ctr_blocks_per_thread
    return -(-n_blocks(nbytes) // per_block)


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything needed to run one batch except its nonces and buffer addresses (see `table`).

    mode: MODE_DECRYPT or MODE_ENCRYPT. sizes: each message's length without the tag. writes
    (decrypt): whether the CTR pass writes that message's plaintext (False: verify only, a DISCARD).
    levels: each message's GHASH levels. ctr_grids: each message's CTR blocks (0 if none).
    table_bytes: the table at the start of scratch; partials_offset: where the GHASH partials start
    (bytes into scratch); launches: in stream order.
    """

    params: GcmParams
    mode: int
    sizes: tuple[int, ...]
    writes: tuple[bool, ...]
    levels: tuple[tuple[Level, ...], ...]
    ctr_grids: tuple[int, ...]
    table_bytes: int
    partials_offset: int
    scratch_bytes: int
    launches: tuple[Launch, ...]
    template: U32Array  # the table with every address and nonce word still zero (read-only)

    @property
    def n(self) -> int:
        return len(self.sizes)

    def flags_offset(self, m: int) -> int:
        """Byte offset of message m's flag in scratch."""
        return 4 * m

    def table(self, nonces: Sequence[bytes], srcs: Sequence[int], dsts: Sequence[int]) -> U32Array:
        """The batch table with each message's nonce and device addresses filled in (flags BAD).

        srcs/dsts are raw device addresses: decrypt: ciphertext || tag and plaintext (0 where the
        message is only verified); encrypt: plaintext and ciphertext || tag.
        """
        n = self.n
        if not len(nonces) == len(srcs) == len(dsts) == n:
            raise ValueError(f"a batch of {n} messages needs {n} nonces, sources and destinations")
        for nonce in nonces:
            if len(nonce) != NONCE_BYTES:
                raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(nonce)}")
        p = self.params
        out = self.template.copy()
        base = p.tab_msgs(n)
        desc = out[base : base + n * p.msg_words].reshape(n, p.msg_words)
        src = np.asarray(srcs, dtype=np.uint64)
        dst = np.asarray(dsts, dtype=np.uint64)
        desc[:, MSG_SRC] = (src & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        desc[:, MSG_SRC + 1] = (src >> np.uint64(32)).astype(np.uint32)
        desc[:, MSG_DST] = (dst & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        desc[:, MSG_DST + 1] = (dst >> np.uint64(32)).astype(np.uint32)
        words = np.frombuffer(b"".join(bytes(x) for x in nonces), dtype=">u4").reshape(n, 3)
        desc[:, MSG_NONCE : MSG_NONCE + 3] = words.astype(np.uint32)
        return out


def _build_template(
    params: GcmParams, sizes: tuple[int, ...], levels: tuple[tuple[Level, ...], ...], ctr_grids: tuple[int, ...]
) -> tuple[U32Array, int]:
    """The table without addresses and nonces, and the number of GHASH partials (uint4) it assigns."""
    n = len(sizes)
    p = params
    table = np.zeros(p.tab_words(n), dtype=np.uint32)
    table[:n] = FLAG_BAD
    base = p.tab_msgs(n)
    desc = table[base : base + n * p.msg_words].reshape(n, p.msg_words)
    starts = table[p.tab_starts(n) :].reshape(p.max_levels + 1, n + 1)
    cursor = 0  # next free partial (uint4 index)
    for m, (size, lvls) in enumerate(zip(sizes, levels, strict=True)):
        desc[m, MSG_NBYTES] = size & 0xFFFFFFFF
        desc[m, MSG_NBYTES + 1] = size >> 32
        for lv in lvls:
            desc[m, MSG_LEVELS + 2 * lv.index] = lv.pad
            if not lv.final:
                desc[m, MSG_LEVELS + 2 * lv.index + 1] = cursor
                cursor += lv.grid
    for k in range(p.max_levels):
        grids = [lvls[k].grid if k < len(lvls) else 0 for lvls in levels]
        starts[k, 1:] = np.cumsum(grids, dtype=np.uint64)
    starts[p.max_levels, 1:] = np.cumsum(ctr_grids, dtype=np.uint64)
    if int(starts.max(initial=0)) >= 1 << 31:
        raise ValueError("batch needs more than 2^31 CUDA blocks in one launch; split it")
    table.setflags(write=False)
    return table, cursor


def check_nonce(nonce: object) -> bytes:
    """A message's 12-byte nonce as bytes (what both the kernels' host side and the reference accept)."""
    if not isinstance(nonce, (bytes, bytearray, memoryview)):
        raise TypeError(f"nonce must be bytes, got {type(nonce).__name__}")
    value = bytes(nonce)
    if len(value) != NONCE_BYTES:
        raise ValueError(f"nonce must be {NONCE_BYTES} bytes, got {len(value)}")
    return value


@lru_cache(maxsize=512)
def _plan(params: GcmParams, mode: int, sizes: tuple[int, ...], writes: tuple[bool, ...]) -> Plan:
    n = len(sizes)
    if not 1 <= n <= MAX_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_BATCH} messages, got {n}")
    levels = tuple(ghash_levels(n_blocks(s), params) for s in sizes)
    ctr = tuple(ctr_grid(s, params) if w else 0 for s, w in zip(sizes, writes, strict=True))
    if mode == MODE_ENCRYPT:
        ctr = tuple(0 for _ in sizes)
    template, n_partials = _build_template(params, sizes, levels, ctr)
    table_bytes = 4 * template.size
    partials_offset = -(-table_bytes // AES_BLOCK) * AES_BLOCK
    scratch = partials_offset + AES_BLOCK * n_partials
    tab = Ptr(Buf.SCRATCH, 0)
    partials = Ptr(Buf.SCRATCH, partials_offset)
    grid_of = [sum(lv[k].grid for lv in levels if k < len(lv)) for k in range(params.max_levels)]
    launches: list[Launch] = []
    if mode == MODE_DECRYPT:
        launches.append(Launch(KERNEL_GHASH_CT, grid_of[0], (Ptr(Buf.CTX), tab, U32(n), partials)))
    else:
        launches.append(Launch(KERNEL_ENCRYPT, grid_of[0], (Ptr(Buf.CTX), tab, U32(n), partials)))
    for k in range(1, params.max_levels):
        if grid_of[k]:
            launches.append(
                Launch(KERNEL_GHASH_REDUCE, grid_of[k], (Ptr(Buf.CTX), tab, U32(n), partials, U32(k), U32(mode)))
            )
    ctr_total = sum(int(c) for c in ctr)
    if mode == MODE_DECRYPT and ctr_total:
        launches.append(Launch(KERNEL_CTR_DECRYPT, ctr_total, (Ptr(Buf.CTX), tab, U32(n))))
    return Plan(
        params=params,
        mode=mode,
        sizes=sizes,
        writes=writes,
        levels=levels,
        ctr_grids=ctr,
        table_bytes=table_bytes,
        partials_offset=partials_offset,
        scratch_bytes=scratch,
        launches=tuple(launches),
        template=template,
    )


def _sizes(sizes: Sequence[int] | int) -> tuple[int, ...]:
    out = (int(sizes),) if isinstance(sizes, int) else tuple(int(s) for s in sizes)
    if any(s < 0 for s in out):
        raise ValueError("message lengths must be >= 0")
    return out


def decrypt_plan(sizes: Sequence[int] | int, params: GcmParams, writes: Sequence[bool] | None = None) -> Plan:
    """Authenticate every message of the batch, then decrypt them all if (and only if) all passed.

    sizes: ciphertext lengths without the tag (an int: one message). writes: per message, False
    for verify-only (no destination), default all True. Memoised per (sizes, writes).
    """
    sz = _sizes(sizes)
    wr = tuple(True for _ in sz) if writes is None else tuple(bool(w) for w in writes)
    if len(wr) != len(sz):
        raise ValueError("writes must have one entry per message")
    return _plan(params, MODE_DECRYPT, sz, wr)


def encrypt_plan(sizes: Sequence[int] | int, params: GcmParams) -> Plan:
    """Fused CTR + GHASH level 0 for every message, then the reduction levels; the final ones write
    the tags. Memoised per sizes."""
    sz = _sizes(sizes)
    return _plan(params, MODE_ENCRYPT, sz, tuple(True for _ in sz))
