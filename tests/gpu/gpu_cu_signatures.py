"""Test-only: the kernel parameter lists of aesgcm.cu, parsed from the source."""

from __future__ import annotations

import re

from pipellm_client.gpu.aesgcm_cuda import cuda_source

_ENTRY = re.compile(r'extern "C" __global__ void __launch_bounds__\(PLM_TPB(?:, \w+)?\)\s+(\w+)\(([^)]*)\)', re.S)


def kernel_signatures() -> dict[str, list[str]]:
    """Kernel name -> parameter kinds in order: "ptr", "u32" or "u64"."""
    out: dict[str, list[str]] = {}
    for name, params in _ENTRY.findall(cuda_source()):
        kinds = []
        for param in params.split(","):
            text = " ".join(param.split())
            if "*" in text:
                kinds.append("ptr")
            elif text.startswith("u64 "):
                kinds.append("u64")
            elif text.startswith("u32 "):
                kinds.append("u32")
            else:
                raise ValueError(f"{name}: unexpected parameter {text!r}")
        out[name] = kinds
    return out
