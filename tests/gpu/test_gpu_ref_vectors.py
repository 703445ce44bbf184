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


@pytest.mark.parametrize("params", PARAMS)
def test_all_vectors_in_one_batch(params: GcmParams) -> None:
    """A batch has one key: the vectors are grouped by key and each group runs as one batch, both
    ways; if no key had two vectors, all of them also run as a batch under a key of our own."""
    by_key: dict[str, list[GcmVector]] = {}
    for vec in ENCRYPT_VECTORS:
        by_key.setdefault(vec.key, []).append(vec)
    for key, vecs in by_key.items():
        ref = RefAesGcm(bytes.fromhex(key), params)
        outs = ref.encrypt_batch([(bytes.fromhex(v.iv), _u8(v.pt)) for v in vecs])
        assert [o.tobytes().hex() for o in outs] == [v.ct + v.tag for v in vecs]
        plain = [np.zeros(len(v.pt) // 2, np.uint8) for v in vecs]
        oks = ref.decrypt_batch_into(
            [(bytes.fromhex(v.iv), _u8(v.ct + v.tag), o) for v, o in zip(vecs, plain, strict=True)]
        )
        assert oks == [True] * len(vecs)
        assert [o.tobytes().hex() for o in plain] == [v.pt for v in vecs]
    key = bytes(range(32))
    nonces = [bytes([i]) * 12 for i in range(len(ENCRYPT_VECTORS))]
    pts = [_u8(v.pt) for v in ENCRYPT_VECTORS]
    outs = RefAesGcm(key, params).encrypt_batch(list(zip(nonces, pts, strict=True)))
    singles = [RefAesGcm(key, params).encrypt(nc, pt) for nc, pt in zip(nonces, pts, strict=True)]
    assert [o.tobytes() for o in outs] == [s.tobytes() for s in singles]
