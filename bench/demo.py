"""`make demo`: a real pipellmd, a real workload through the SDK, every byte checked, status printed.

The workload is a miniature of weight offloading plus KV swapping: each step loads a few dozen "layers" of
weights in forward order while the previous layer "computes" (a short wait, as a GPU would), then a batch
of KV blocks is swapped out and later swapped back in. The same workload runs against a plain daemon (no
encryption) and a naive-CC daemon (encrypt on demand, one worker) for the time ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from pipellm_client import Client

from pipellm_daemon.launcher import DaemonProcess

LAYERS = 24
LAYER_BYTES = 4 << 20
STEPS = 6
COMPUTE_S = 0.004  # per layer: a stand-in for the GPU computing while the next layer arrives
KV_BLOCKS = 16
KV_BLOCK = 512 << 10


def show_status(socket: str) -> None:
    print(f"$ pipellmctl --socket {socket} status", flush=True)
    subprocess.run([sys.executable, "-m", "pipellm_client.ctl.main", "--socket", socket, "status"], check=False)


class Device:
    """Where the endpoint puts data: host arrays (CPU endpoint) or CuPy arrays on a GPU (CUDA endpoint)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.xp: Any = np
        if kind == "cuda":
            import cupy

            self.xp = cupy

    def empty(self, n: int) -> Any:
        return self.xp.empty(n, dtype=self.xp.uint8)

    def upload(self, a: np.ndarray[Any, Any]) -> Any:
        return self.xp.asarray(a)

    def host(self, a: Any) -> np.ndarray[Any, Any]:
        return a if self.xp is np else self.xp.asnumpy(a)


def workload(
    socket: str, seed: int = 7, show: bool = False, endpoint: str = "cpu", plain: bool = False
) -> dict[str, float]:
    """Run the workload once; returns timings and counters. Raises if any delivered byte is wrong.

    `plain` accepts a daemon in plain mode (the no-encryption baseline of the comparison)."""
    dev = Device(endpoint)
    rng = np.random.default_rng(seed)
    weights = rng.integers(0, 256, LAYERS * LAYER_BYTES, dtype=np.uint8)
    blocks = [rng.integers(0, 256, KV_BLOCK, dtype=np.uint8) for _ in range(KV_BLOCKS)]
    with Client(socket) as c, c.open_session("demo", endpoint=endpoint, allow_plain=plain) as s:
        w = s.alloc_region(weights.size, readonly=True, name="weights", data=weights)
        kv = s.alloc_region(KV_BLOCKS * KV_BLOCK, name="kv-cache")
        layer = dev.empty(LAYER_BYTES)
        checked = 0
        t0 = time.perf_counter()
        for _step in range(STEPS):
            for j in range(LAYERS):
                s.h2d(w, j * LAYER_BYTES, LAYER_BYTES, layer)
                if not np.array_equal(dev.host(layer), weights[j * LAYER_BYTES : (j + 1) * LAYER_BYTES]):
                    raise SystemExit(f"demo: layer {j} arrived corrupted")
                checked += LAYER_BYTES
                time.sleep(COMPUTE_S)
        t_weights = time.perf_counter() - t0
        # KV swapping: swap out every block (device -> host), let the engine run a while, swap back in.
        t1 = time.perf_counter()
        for i, b in enumerate(blocks):
            s.d2h(dev.upload(b), kv, i * KV_BLOCK, swap_out=True, group=i // 4 + 1)
        s.wait_all()
        time.sleep(COMPUTE_S * 8)
        back = dev.empty(KV_BLOCK)
        for i, b in enumerate(blocks):
            s.h2d(kv, i * KV_BLOCK, KV_BLOCK, back)
            if not np.array_equal(dev.host(back), b):
                raise SystemExit(f"demo: KV block {i} came back corrupted")
            checked += KV_BLOCK
        t_kv = time.perf_counter() - t1
        cnt = s.status().counters
        if show:
            show_status(socket)
        return {
            "t_weights": t_weights,
            "t_kv": t_kv,
            "checked": checked,
            "bytes": cnt.bytes_h2d + cnt.bytes_d2h,
            "hits": cnt.hits,
            "judged": cnt.hits + cnt.misses + cnt.skips + cnt.late,
            "kv_d2h": cnt.bytes_d2h,
            "staged": cnt.staged,
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--endpoint", choices=("cpu", "cuda"), default="cpu", help="where the 'GPU' side runs")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    print(
        f"PipeLLM demo ({args.endpoint} endpoint): weight offloading + KV swapping through pipellmd, "
        "every byte verified\n"
    )
    results = {}
    for mode in ("plain", "naive", "pipellm"):
        settings = {"workers": args.workers} if mode != "naive" else {}
        with DaemonProcess(mode=mode, **settings) as d:
            results[mode] = workload(d.socket, show=mode == "pipellm", endpoint=args.endpoint, plain=mode == "plain")
            code = d.stop()
            if code != 0:
                print(f"demo: pipellmd ({mode}) exited with {code}", file=sys.stderr)
                return 1
    p, n, x = results["plain"], results["naive"], results["pipellm"]
    hit_rate = x["hits"] / x["judged"] if x["judged"] else 0.0
    total = lambda r: r["t_weights"] + r["t_kv"]  # noqa: E731
    print(
        f"\ndemo: moved {x['bytes'] / 2**20:.0f} MiB through the confidential channel, {x['checked'] / 2**20:.0f} MiB "
        f"verified byte for byte; hit rate {hit_rate:.1%}; time vs plain: pipellm {total(x) / total(p):.3f}x, "
        f"naive CC {total(n) / total(p):.3f}x (one run each, this machine; see `make bench` for the method)"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "endpoint": args.endpoint,
                    "hit_rate": hit_rate,
                    "modes": results,
                    "time_vs_plain": {"pipellm": total(x) / total(p), "naive": total(n) / total(p)},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
