"""Make the GPU tests importable however pytest is invoked (the SDK lives under client/)."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_CLIENT = _HERE.parents[1] / "client"

for _path in (str(_HERE), str(_CLIENT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
