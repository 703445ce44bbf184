"""The GPU check, as one run: GPU tests, kernel throughput against a device-to-device copy, the demo
workload with the CUDA endpoint, then a table and JSON. Each step has a time limit so the whole run stays
well under 6 minutes on an H100; a failing step is reported and the others still run."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

STEPS_S = {"tests": 240, "kernels": 120, "demo": 150}


def run(name: str, cmd: list[str], limit: int, log: Path) -> dict[str, Any]:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit, check=False
            )
            fh.write(proc.stdout)
        print(proc.stdout[-6000:], flush=True)
        rc = proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write_text(out)
        print(out[-3000:] + f"\n{name}: TIMED OUT after {limit} s", flush=True)
        rc = 124
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": str(log)}


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"]
        info.update(
            cupy=cupy.__version__,
            device=name.decode() if isinstance(name, bytes) else str(name),
            cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(),
            sms=props["multiProcessorCount"],
        )
    except Exception as exc:  # reported, not fatal: the steps will say what is missing
        info["cupy_error"] = f"{type(exc).__name__}: {exc}"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        info["nvidia_smi"] = q.stdout.strip()
    return info


def junit_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    info = device_info()
    print("gpu-check:", json.dumps(info), flush=True)
    py = sys.executable
    steps = {
        "tests": run(
            "GPU tests",
            [
                py,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-o",
                "addopts=",
                "tests/gpu/test_gpu_cuda.py",
                "tests/gpu/test_gpu_endpoint.py",
                f"--junitxml={out / 'gpu-tests.xml'}",
            ],
            STEPS_S["tests"],
            out / "gpu-tests.log",
        ),
        "kernels": run(
            "kernel throughput",
            [py, "bench/gpu_kernels.py", "--json", str(out / "gpu_kernels.json")],
            STEPS_S["kernels"],
            out / "gpu-kernels.log",
        ),
        "demo": run(
            "demo, CUDA endpoint",
            [py, "-m", "bench.demo", "--endpoint", "cuda", "--json", str(out / "gpu_demo.json")],
            STEPS_S["demo"],
            out / "gpu-demo.log",
        ),
    }
    tests = junit_counts(out / "gpu-tests.xml")
    kernels = json.loads((out / "gpu_kernels.json").read_text()) if (out / "gpu_kernels.json").exists() else {}
    demo = json.loads((out / "gpu_demo.json").read_text()) if (out / "gpu_demo.json").exists() else {}
    summary = {
        "device": info,
        "steps": steps,
        "tests": tests,
        "kernels": kernels,
        "demo": demo,
        "seconds": round(time.monotonic() - t0, 1),
    }
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n==================== gpu-check summary ====================")
    print(f"device   {info.get('device', info.get('cupy_error'))}  ({info.get('nvidia_smi', '')})")
    print(f"tests    {tests}  rc={steps['tests']['rc']}  {steps['tests']['seconds']} s")
    for r in kernels.get("results", []):
        print(
            f"kernel   {r['size']:>12} {r['op']:>18} {r['gbps']:>8.1f} GB/s  copy {r['copy_gbps']:>8.1f} GB/s  "
            f"x copy {r['ratio_to_copy']:.3f}"
        )
    if "skipped" in kernels:
        print(f"kernel   skipped: {kernels['skipped']}")
    if demo:
        print(
            f"demo     hit rate {demo['hit_rate']:.1%}; time vs plain: "
            f"pipellm {demo['time_vs_plain']['pipellm']:.3f}x, naive {demo['time_vs_plain']['naive']:.3f}x; "
            f"staged hits {demo['modes']['pipellm'].get('staged')}"
        )
    print(f"total    {summary['seconds']} s; JSON in {out / 'gpu-check.json'}")
    ok = all(s["rc"] == 0 for s in steps.values())
    print("gpu-check: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
