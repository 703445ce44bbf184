"""Whether the integration tests can run on a real GPU: torch must see a CUDA device and CuPy must work."""

from __future__ import annotations


def real_gpu() -> tuple[bool, str]:
    """(usable, why not): probed lazily, so a machine without torch's CUDA build never imports CuPy."""
    import torch
    from pipellm_client.gpu import cuda_available

    if not torch.cuda.is_available():
        return False, "torch has no CUDA device"
    return cuda_available()
