"""The numpy reference (the GPU kernels' algorithm) against NIST CAVP AES-256-GCM vectors."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_vectors import DECRYPT_VECTORS, ENCRYPT_VECTORS, GcmVector
from pipellm_client.gpu import GcmParams, RefAesGcm, TagMismatch

# Production decomposition plus a tiny one that forces several GHASH levels on small inputs.
PARAMS = [
    pytest.param(GcmParams(), id="default"),
    pytest.param(
        GcmParams(threads_per_block=32, ctr_blocks_per_thread=3, ghash_run0=2, ghash_run=2, enc_group=1),
        id="tiny",
    ),
]


def _u8(hexstr: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8)


def test_vector_set_covers_what_matters() -> None:
    lengths = {len(v.pt) // 2 for v in ENCRYPT_VECTORS}
    assert 0 in lengths
    assert any(n % 16 for n in lengths)  # a partial final block
    assert any(not v.valid for v in DECRYPT_VECTORS)
    assert any(v.valid for v in DECRYPT_VECTORS)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("vec", ENCRYPT_VECTORS, ids=lambda v: v.name)
def test_encrypt_known_answer(vec: GcmVector, params: GcmParams) -> None:
    ref = RefAesGcm(bytes.fromhex(vec.key), params)
    out = ref.encrypt(bytes.fromhex(vec.iv), _u8(vec.pt))
    assert out.tobytes().hex() == vec.ct + vec.tag


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("vec", ENCRYPT_VECTORS, ids=lambda v: v.name)
def test_decrypt_of_encrypt_vectors(vec: GcmVector, params: GcmParams) -> None:
    ref = RefAesGcm(bytes.fromhex(vec.key), params)
    pt = ref.decrypt(bytes.fromhex(vec.iv), _u8(vec.ct + vec.tag))
    assert pt.tobytes().hex() == vec.pt


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("vec", DECRYPT_VECTORS, ids=lambda v: v.name)
def test_decrypt_known_answer(vec: GcmVector, params: GcmParams) -> None:
    ref = RefAesGcm(bytes.fromhex(vec.key), params)
    data = _u8(vec.ct + vec.tag)
    if vec.valid:
        assert ref.decrypt(bytes.fromhex(vec.iv), data).tobytes().hex() == vec.pt
    else:
        with pytest.raises(TagMismatch):
            ref.decrypt(bytes.fromhex(vec.iv), data)
        out = np.full(len(vec.ct) // 2, 0x5C, dtype=np.uint8)
        assert not ref.decrypt_into(bytes.fromhex(vec.iv), data, out)
        assert (out == 0x5C).all()  # destination untouched on failure
