"""AES-256-GCM for the GPU side of the channel: CuPy kernels plus a numpy reference of the same
algorithm. Importing this package never imports CuPy; :func:`cuda_available` says whether the GPU
path can run here.
"""

from __future__ import annotations

from .aesgcm_cuda import CudaAesGcm, DecryptResult, cuda_available, decrypt_results_ok
from .aesgcm_ref import RefAesGcm
from .errors import TagMismatch
from .params import DEFAULT_PARAMS, GcmParams

__all__ = [
    "DEFAULT_PARAMS",
    "CudaAesGcm",
    "DecryptResult",
    "GcmParams",
    "RefAesGcm",
    "TagMismatch",
    "cuda_available",
    "decrypt_results_ok",
]
