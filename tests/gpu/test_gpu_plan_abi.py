"""Every launch in a plan passes exactly the kernel's parameter list: pointers as 64-bit values,
u32 and u64 scalars where the kernel has them (CuPy packs numpy scalars by their own size, so a
mismatch would shift every later argument on the GPU)."""

from __future__ import annotations

import pytest
from gpu_cu_signatures import kernel_signatures
from pipellm_client.gpu import DEFAULT_PARAMS, GcmParams
from pipellm_client.gpu.params import KERNEL_NAMES
from pipellm_client.gpu.plan import U32, U64, Ptr, decrypt_plan, encrypt_plan

TINY = GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1)


def test_all_kernels_parsed() -> None:
    assert set(kernel_signatures()) == set(KERNEL_NAMES)


@pytest.mark.parametrize("params", [DEFAULT_PARAMS, TINY], ids=["default", "tiny"])
@pytest.mark.parametrize("n", [0, 1, 100_000, 3 << 20])
def test_plan_arguments_match_kernel_signatures(params: GcmParams, n: int) -> None:
    sigs = kernel_signatures()
    seen = set()
    multi_level = len(decrypt_plan(n, bytes(12), params).levels) > 1
    for plan in (decrypt_plan(n, bytes(12), params), encrypt_plan(n, bytes(12), params)):
        for launch in plan.launches:
            kinds = ["ptr" if isinstance(a, Ptr) else "u32" if isinstance(a, U32) else "u64" for a in launch.args]
            assert kinds == sigs[launch.kernel], launch.kernel
            for arg in launch.args:
                if isinstance(arg, U32):
                    assert 0 <= arg.value < 1 << 32
                elif isinstance(arg, U64):
                    assert 0 <= arg.value < 1 << 64
                else:
                    assert arg.offset >= 0
            assert launch.grid >= 1
            seen.add(launch.kernel)
    if multi_level:
        assert seen == set(KERNEL_NAMES)
