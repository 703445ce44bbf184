"""Every launch in a plan passes exactly the kernel's parameter list: pointers as 64-bit values,
u32 and u64 scalars where the kernel has them (CuPy packs numpy scalars by their own size, so a
mismatch would shift every later argument on the GPU). And the batch table says what the kernels
read: each message's blocks, paddings and partials, with the launch count fixed whatever the batch."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_cu_signatures import kernel_signatures
from pipellm_client.gpu import DEFAULT_PARAMS, GcmParams
from pipellm_client.gpu.params import (
    FLAG_BAD,
    KERNEL_CTR_DECRYPT,
    KERNEL_ENCRYPT,
    KERNEL_GHASH_CT,
    KERNEL_GHASH_REDUCE,
    KERNEL_NAMES,
    MAX_BATCH,
    MSG_DST,
    MSG_LEVELS,
    MSG_NBYTES,
    MSG_NONCE,
    MSG_SRC,
)
from pipellm_client.gpu.plan import U32, U64, Ptr, ctr_grid, decrypt_plan, encrypt_plan

TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)
MIB = 1 << 20


def test_all_kernels_parsed() -> None:
    assert set(kernel_signatures()) == set(KERNEL_NAMES)


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("sizes", [[0], [1], [100_000], [3 << 20], [MIB] * 16, [0, 17, 3 << 20, 5, MIB + 3]])
def test_plan_arguments_match_kernel_signatures(params: GcmParams, sizes: list[int]) -> None:
    sigs = kernel_signatures()
    seen = set()
    dec = decrypt_plan(sizes, params)
    multi_level = any(len(lv) > 1 for lv in dec.levels)
    for plan in (dec, encrypt_plan(sizes, params)):
        for launch in plan.launches:
            kinds = ["ptr" if isinstance(a, Ptr) else "u32" if isinstance(a, U32) else "u64" for a in launch.args]
            assert kinds == sigs[launch.kernel], launch.kernel
            for arg in launch.args:
                if isinstance(arg, U32):
                    assert 0 <= arg.value < 1 << 32
                elif isinstance(arg, U64):
                    assert 0 <= arg.value < 1 << 64
                else:
                    assert 0 <= arg.offset <= plan.scratch_bytes
            assert 1 <= launch.grid < 1 << 31
            assert launch.args[2] == U32(len(sizes))  # n, right after ctx and the table
            seen.add(launch.kernel)
    if multi_level and any(sizes):
        assert seen == set(KERNEL_NAMES)


@pytest.mark.parametrize("n", [1, 2, 16, 64, 257])
def test_launch_count_is_fixed_whatever_the_batch(n: int) -> None:
    """The issue's point: a batch of n 1 MiB chunks costs the same launches as one chunk."""
    dec = decrypt_plan([MIB] * n, DEFAULT_PARAMS)
    assert [x.kernel for x in dec.launches] == [KERNEL_GHASH_CT, KERNEL_GHASH_REDUCE, KERNEL_CTR_DECRYPT]
    assert [x.grid for x in dec.launches] == [32 * n, n, 64 * n]
    enc = encrypt_plan([MIB] * n, DEFAULT_PARAMS)
    assert [x.kernel for x in enc.launches] == [KERNEL_ENCRYPT, KERNEL_GHASH_REDUCE]
    big = decrypt_plan([64 * MIB] * n if n <= 16 else [64 * MIB], DEFAULT_PARAMS)
    assert len(big.launches) == DEFAULT_PARAMS.max_levels + 1  # GHASH levels + CTR, never more


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
def test_table_describes_each_message(params: GcmParams) -> None:
    sizes = [0, 17, 3 << 20, 5, MIB + 3, 64 << 10]
    writes = [True, True, False, True, True, True]
    plan = decrypt_plan(sizes, params, writes)
    nonces = [bytes([i]) * 12 for i in range(len(sizes))]
    srcs = [0x1000_0000 * (i + 1) + 0xABC0 for i in range(len(sizes))]
    dsts = [(0x7F00_0000_0000 + 0x100 * i) if w else 0 for i, w in enumerate(writes)]
    t = plan.table(nonces, srcs, dsts)
    n, p = len(sizes), params
    assert t.dtype == np.uint32 and t.size == p.tab_words(n) and 4 * t.size == plan.table_bytes
    assert (t[:n] == FLAG_BAD).all(), "the upload resets every flag"
    desc = t[p.tab_msgs(n) : p.tab_starts(n)].reshape(n, p.msg_words)
    starts = t[p.tab_starts(n) :].reshape(p.max_levels + 1, n + 1)
    partials_seen: set[int] = set()
    for m, size in enumerate(sizes):
        d = desc[m]
        assert int(d[MSG_SRC]) | int(d[MSG_SRC + 1]) << 32 == srcs[m]
        assert int(d[MSG_DST]) | int(d[MSG_DST + 1]) << 32 == dsts[m]
        assert int(d[MSG_NBYTES]) | int(d[MSG_NBYTES + 1]) << 32 == size
        assert bytes(np.asarray(d[MSG_NONCE : MSG_NONCE + 3], dtype=">u4").tobytes()) == nonces[m]
        for lv in plan.levels[m]:
            assert d[MSG_LEVELS + 2 * lv.index] == lv.pad
            assert starts[lv.index, m + 1] - starts[lv.index, m] == lv.grid
            if not lv.final:  # its partials: a private range of the partials area
                first = int(d[MSG_LEVELS + 2 * lv.index + 1])
                rng = set(range(first, first + lv.grid))
                assert not rng & partials_seen
                partials_seen |= rng
                assert plan.partials_offset + 16 * (first + lv.grid) <= plan.scratch_bytes
        for k in range(len(plan.levels[m]), p.max_levels):
            assert starts[k, m + 1] == starts[k, m], "no block at a level the message does not have"
        ctr = starts[p.max_levels, m + 1] - starts[p.max_levels, m]
        assert ctr == (ctr_grid(size, params) if writes[m] else 0)
    assert plan.partials_offset % 16 == 0 and plan.partials_offset >= plan.table_bytes
    for launch in plan.launches:
        k = 0
        if launch.kernel == KERNEL_CTR_DECRYPT:
            k = p.max_levels
        elif launch.kernel == KERNEL_GHASH_REDUCE:
            level = launch.args[4]
            assert isinstance(level, U32)
            k = level.value
        assert launch.grid == starts[k, n]


def test_plan_limits_and_errors() -> None:
    with pytest.raises(ValueError, match=r"1\.\.4096"):
        decrypt_plan([], DEFAULT_PARAMS)
    with pytest.raises(ValueError, match=rf"1\.\.{MAX_BATCH}"):
        decrypt_plan([16] * (MAX_BATCH + 1), DEFAULT_PARAMS)
    with pytest.raises(ValueError, match=">= 0"):
        encrypt_plan([-1], DEFAULT_PARAMS)
    with pytest.raises(ValueError, match="one entry per message"):
        decrypt_plan([1, 2], DEFAULT_PARAMS, [True])
    plan = decrypt_plan([1, 2], DEFAULT_PARAMS)
    with pytest.raises(ValueError, match="12 bytes"):
        plan.table([bytes(12), bytes(8)], [16, 32], [48, 64])
    with pytest.raises(ValueError, match="needs 2 nonces"):
        plan.table([bytes(12)], [16], [48])
    assert decrypt_plan([MIB] * 3, DEFAULT_PARAMS) is decrypt_plan((MIB, MIB, MIB), DEFAULT_PARAMS)  # memoised
