"""The launch sequence for one AES-GCM message, as data.

The CUDA class, the numpy reference and the test-only CPU emulation of the kernels all execute the
same :class:`Plan`, so the sequence of launches, grid sizes, paddings and scratch offsets is written
once. Pointers are symbolic (which buffer, byte offset); each executor resolves them.

GHASH decomposition (levels): level 0 folds the n ciphertext blocks, level L >= 1 folds the partials
of level L-1. At level L a thread folds ``run_length(L)`` consecutive items by Horner
(Y = Y*Q_L ^ item), a CUDA block combines its threads' Y with multipliers Q_L^(run*(TPB-1-t)) and
XORs them into one partial per block. The items are front-padded with zero items up to a whole
number of blocks (leading zeros leave a Horner sum unchanged), so every multiplier is a power of
Q_L^run. The level whose grid is 1 is final: it finishes GHASH with the length block, XORs
E_K(J0) and either writes the tag (encrypt) or compares it and writes the device flag (decrypt).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from .params import (
    AES_BLOCK,
    KERNEL_CTR_DECRYPT,
    KERNEL_ENCRYPT,
    KERNEL_GHASH_CT,
    KERNEL_GHASH_REDUCE,
    MODE_DECRYPT,
    MODE_ENCRYPT,
    NONCE_BYTES,
    GcmParams,
)

FLAG_BYTES = 16  # the flag word, padded so the partials that follow stay 16-byte aligned


class Buf(Enum):
    """Buffers a plan refers to."""

    CTX = "ctx"  # the per-key context (uint32 words)
    SRC = "src"  # encrypt: plaintext; decrypt: ciphertext || tag
    DST = "dst"  # encrypt: ciphertext || tag; decrypt: plaintext
    SCRATCH = "scratch"  # flag word, then the GHASH partials of each non-final level


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
    """One GHASH level: fold n_items into `grid` partials (grid == 1: final)."""

    index: int
    n_items: int
    run: int
    grid: int
    pad: int

    @property
    def final(self) -> bool:
        return self.grid == 1


@dataclass(frozen=True)
class Plan:
    """Everything needed to run one message: scratch size and the launches, in stream order."""

    scratch_bytes: int
    levels: tuple[Level, ...]
    launches: tuple[Launch, ...]


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


def _scratch_layout(levels: tuple[Level, ...]) -> tuple[int, list[int]]:
    """Byte offset of each level's output partials (final level: none) and the scratch size."""
    offsets = []
    cursor = FLAG_BYTES
    for level in levels:
        offsets.append(cursor)
        if not level.final:
            cursor += level.grid * AES_BLOCK
    return cursor, offsets


def _reduce_launches(
    levels: tuple[Level, ...],
    offsets: list[int],
    *,
    msg_len: int,
    nw: tuple[int, int, int],
    tag: Ptr,
    mode: int,
) -> list[Launch]:
    launches = []
    for level in levels[1:]:
        launches.append(
            Launch(
                KERNEL_GHASH_REDUCE,
                level.grid,
                (
                    Ptr(Buf.CTX),
                    Ptr(Buf.SCRATCH, offsets[level.index - 1]),  # previous level's partials
                    U64(level.n_items),
                    U64(level.pad),
                    U32(level.index),
                    Ptr(Buf.SCRATCH, offsets[level.index]),
                    U64(msg_len),
                    U32(nw[0]),
                    U32(nw[1]),
                    U32(nw[2]),
                    tag,
                    Ptr(Buf.SCRATCH, 0),
                    U32(mode),
                ),
            )
        )
    return launches


def decrypt_plan(ct_len: int, nonce: bytes, params: GcmParams) -> Plan:
    """GHASH over the ciphertext, tag check into the flag, then the flag-gated CTR pass."""
    nw = nonce_words(nonce)
    levels = ghash_levels(n_blocks(ct_len), params)
    scratch, offsets = _scratch_layout(levels)
    tag = Ptr(Buf.SRC, ct_len)
    first = levels[0]
    launches = [
        Launch(
            KERNEL_GHASH_CT,
            first.grid,
            (
                Ptr(Buf.CTX),
                Ptr(Buf.SRC, 0),
                U64(ct_len),
                U64(first.pad),
                Ptr(Buf.SCRATCH, offsets[0]),
                U32(nw[0]),
                U32(nw[1]),
                U32(nw[2]),
                tag,
                Ptr(Buf.SCRATCH, 0),
                U32(MODE_DECRYPT),
            ),
        )
    ]
    launches += _reduce_launches(levels, offsets, msg_len=ct_len, nw=nw, tag=tag, mode=MODE_DECRYPT)
    if ct_len:
        per_block = params.threads_per_block * params.ctr_blocks_per_thread
        launches.append(
            Launch(
                KERNEL_CTR_DECRYPT,
                -(-n_blocks(ct_len) // per_block),
                (
                    Ptr(Buf.CTX),
                    Ptr(Buf.SRC, 0),
                    Ptr(Buf.DST, 0),
                    U64(ct_len),
                    U32(nw[0]),
                    U32(nw[1]),
                    U32(nw[2]),
                    Ptr(Buf.SCRATCH, 0),
                ),
            )
        )
    return Plan(scratch_bytes=scratch, levels=levels, launches=tuple(launches))


def encrypt_plan(pt_len: int, nonce: bytes, params: GcmParams) -> Plan:
    """Fused CTR + GHASH level 0, then the reduction levels; the final one writes the tag."""
    nw = nonce_words(nonce)
    levels = ghash_levels(n_blocks(pt_len), params)
    scratch, offsets = _scratch_layout(levels)
    tag = Ptr(Buf.DST, pt_len)
    first = levels[0]
    launches = [
        Launch(
            KERNEL_ENCRYPT,
            first.grid,
            (
                Ptr(Buf.CTX),
                Ptr(Buf.SRC, 0),
                Ptr(Buf.DST, 0),
                U64(pt_len),
                U64(first.pad),
                Ptr(Buf.SCRATCH, offsets[0]),
                U32(nw[0]),
                U32(nw[1]),
                U32(nw[2]),
                tag,
            ),
        )
    ]
    launches += _reduce_launches(levels, offsets, msg_len=pt_len, nw=nw, tag=tag, mode=MODE_ENCRYPT)
    return Plan(scratch_bytes=scratch, levels=levels, launches=tuple(launches))
