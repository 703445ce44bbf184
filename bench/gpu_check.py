"""The GPU check, as one run: GPU tests, kernel throughput against a device-to-device copy, the bench
harness end to end with the CUDA endpoint, the demo with the CUDA endpoint, then a table and JSON.

    python -m bench.gpu_check --out DIR          # on a CUDA machine (make gpu-check)
    python -m bench.gpu_check --out DIR --dry-run  # anywhere: every step against the fake GPU of tests/gpu

The whole run has a budget (TOTAL_S, under 5 minutes on an H100/H200 so that one rerun fits in the
device time): each step gets the smaller of its own limit and what is left, and a step that would start
with too little time is skipped and reported. A failing step is reported and the others still run.

End to end (issue 14, item 3): `bench.harness --quick --endpoint cuda --verify 1`, i.e. the real daemons,
plain / naive / PipeLLM interleaved, destinations and D2H sources in GPU memory, every DATA message
decrypted and checked on the GPU (from device staging the daemon filled by DMA, or by DMA from the pinned
bounce arena), each completion's messages as one GPU batch. The quick suite runs in GROUPS, one harness
invocation each, in order, as long as the budget allows, and the results are merged; the summary says
which workloads ran.

--dry-run runs the same steps through tests/gpu/fake_cupy_run.py: the fake CuPy whose kernels are
`cryptography` on the very batch tables the real kernels read (the kernels themselves are checked by the
emulator in the CPU test suite): GPU tests are only collected, the kernel benchmark runs at 1/256 size,
the harness runs the first workload of each group once in the testbed regime. Every command line, file
and summary field of the device run is exercised; the numbers mean nothing.
"""

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

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 285  # the whole check, hard budget
LIMITS_S = {"tests": 100, "kernels": 45, "e2e": 200, "demo": 40}
RESERVE_S = {"e2e": 25}  # left for the steps after it (the demo)
MIN_START_S = 15  # a step that would get less than this is skipped
# The quick suite (bench/workloads/), one harness run per group, most informative first.
GROUPS = (
    ("flexgen-opt30b", "accelerate-llama2-7b", "vllm-v0-llama2-7b", "vllm-v1-llama2-7b", "lora-llama2-7b"),
    ("adversarial", "flexgen-opt66b", "flexgen-opt175b", "vllm-v0-opt30b", "vllm-v0-opt66b"),
    ("flexgen-kv-opt30b", "vllm-v0-blocks-llama2-7b", "lora-mispredicted-llama2-7b"),
)
GPU_TESTS = ("tests/gpu/test_gpu_cuda.py", "tests/gpu/test_gpu_endpoint.py")
FAKE_RUN = "tests/gpu/fake_cupy_run.py"


class Budget:
    def __init__(self, total: float) -> None:
        self.t0 = time.monotonic()
        self.total = total

    def left(self) -> float:
        return self.total - (time.monotonic() - self.t0)

    def grant(self, step: str, reserve: float = 0.0) -> int:
        return int(min(LIMITS_S[step], self.left() - reserve))


def run(name: str, cmd: list[str], limit: int, log: Path) -> dict[str, Any]:
    if limit < MIN_START_S:
        print(f"\n=== {name}: SKIPPED (budget: {limit} s left for it)", flush=True)
        return {"rc": None, "seconds": 0.0, "log": str(log), "skipped": "budget", "cmd": cmd}
    print(f"\n=== {name} (limit {limit} s): {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    try:
        with log.open("w") as fh:
            proc = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit, check=False, cwd=ROOT
            )
            fh.write(proc.stdout)
        print(proc.stdout[-6000:], flush=True)
        rc = proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write_text(out)
        print(out[-3000:] + f"\n{name}: TIMED OUT after {limit} s", flush=True)
        rc = 124
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": str(log), "cmd": cmd}


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
            sms=props.get("multiProcessorCount"),
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


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def e2e_summary(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge the harness reports of the groups; per workload@regime the overheads, bounds and targets."""
    rows: dict[str, Any] = {}
    runs = []
    for g in groups:
        report = g.get("report") or {}
        runs.append(
            {
                "workloads": list(g["workloads"]),
                "rc": g["step"]["rc"],
                "seconds": g["step"]["seconds"],
                "skipped": g["step"].get("skipped"),
                "capacity_gbps": round(report.get("capacity", {}).get("used", {}).get("aggregate_bps", 0.0) / 1e9, 2),
                "testbed_speed": report.get("scale", {}).get("testbed", {}).get("speed"),
                "endpoint": report.get("endpoint"),
                "verify": report.get("verify"),
            }
        )
        for key, w in report.get("workloads", {}).items():
            pllm, naive = w["overhead_pct"]["pipellm"], w["overhead_pct"]["naive"]
            target = w["target_pct"]
            rows[key] = {
                "pipellm_pct": pllm,
                "naive_pct": naive,
                "bound_pct": w["bound_pct"],
                "burst_bound_pct": w.get("burst_bound_pct"),  # where the harness computes one
                "target_pct": target,
                "met": bool(pllm <= target and pllm <= naive),
                "hit_rate": w["pipellm"].get("hit_rate"),
                "staged": w["pipellm"]["counters"].get("staged"),
                "verified": w["pipellm"].get("endpoint", {}).get("verified"),
            }
    ran = sorted({k.split("@")[0] for k in rows})
    wanted = [w for g in groups for w in g["workloads"]]
    return {
        "runs": runs,
        "workloads": rows,
        "ran": ran,
        "not_run": [w for w in wanted if w not in ran],
        "met": sum(r["met"] for r in rows.values()),
        "judged": len(rows),
        "target": "PipeLLM overhead <= max(5, bound + 3) % (adversarial: naive + 5) and <= naive, every workload",
    }


def print_summary(summary: dict[str, Any]) -> None:
    info, steps = summary["device"], summary["steps"]
    print("\n==================== gpu-check summary ====================")
    if summary.get("dry_run"):
        print("DRY RUN (fake GPU: cryptography in place of the kernels; numbers mean nothing)")
    print(f"device   {info.get('device', info.get('cupy_error'))}  ({info.get('nvidia_smi', '')})")
    for name, st in steps.items():
        state = st.get("skipped") or f"rc={st['rc']}"
        print(f"step     {name:<8} {state:<10} {st['seconds']:>6} s")
    print(f"tests    {summary['tests']}")
    kernels = summary["kernels"]
    for r in kernels.get("results", []):
        print(
            f"kernel   {r['size']:>12} {r['op']:>18} {r['gbps']:>8.1f} GB/s  copy {r['copy_gbps']:>8.1f} GB/s  "
            f"x copy {r['ratio_to_copy']:.3f}"
        )
    for name, t in kernels.get("targets", {}).items():
        verdict = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        got = f"{t['gbps']:.1f} GB/s ({t['ratio_to_copy']:.3f} x copy)"
        print(f"target   {name} >= {t['target_gbps']:.0f} GB/s: {got} {verdict}")
    if "skipped" in kernels:
        print(f"kernel   skipped: {kernels['skipped']}")
    e2e = summary["e2e"]
    for key, r in e2e.get("workloads", {}).items():
        burst = "n/a" if r["burst_bound_pct"] is None else f"{r['burst_bound_pct']:.1f}"
        print(
            f"e2e      {key:<32} pipellm {r['pipellm_pct']:6.1f}%  naive {r['naive_pct']:6.1f}%  bound "
            f"{r['bound_pct']:5.1f}%  burst {burst:>5}  target {r['target_pct']:5.1f}%  hit {r['hit_rate'] or 0:.2f}  "
            f"{'met' if r['met'] else 'MISSED'}"
        )
    if e2e.get("judged"):
        print(
            f"e2e      targets met on {e2e['met']}/{e2e['judged']} workload@regime; not run: {e2e['not_run'] or 'none'}"
        )
    demo = summary["demo"]
    if demo:
        print(
            f"demo     hit rate {demo['hit_rate']:.1%}; time vs plain: "
            f"pipellm {demo['time_vs_plain']['pipellm']:.3f}x, naive {demo['time_vs_plain']['naive']:.3f}x; "
            f"staged hits {demo['modes']['pipellm'].get('staged')}"
        )
    print(f"total    {summary['seconds']} s (budget {TOTAL_S} s); JSON in {summary['json']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: every step against the fake GPU of tests/gpu")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(TOTAL_S)
    py = sys.executable
    dry = args.dry_run
    fake = [py, str(ROOT / FAKE_RUN)] if dry else [py]
    info = device_info() if not dry else {"python": platform.python_version(), "device": "fake GPU (dry run)"}
    print("gpu-check:", json.dumps(info), flush=True)
    steps: dict[str, dict[str, Any]] = {}

    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *GPU_TESTS]
    pytest += ["--collect-only"] if dry else [f"--junitxml={out / 'gpu-tests.xml'}"]
    steps["tests"] = run("GPU tests", pytest, budget.grant("tests"), out / "gpu-tests.log")

    kernels_cmd = [*fake, "bench/gpu_kernels.py", "--json", str(out / "gpu_kernels.json")]
    kernels_cmd += ["--small", "--reps", "10", "--warmup", "1"] if dry else []
    steps["kernels"] = run("kernel throughput", kernels_cmd, budget.grant("kernels"), out / "gpu-kernels.log")

    groups: list[dict[str, Any]] = []
    for i, group in enumerate(GROUPS):
        names = group[:1] if dry else group
        gdir = out / f"e2e-{i + 1}"
        cmd = [*([*fake, "-m"] if dry else [py, "-m"]), "bench.harness", "--quick", "--endpoint", "cuda",
               "--verify", "1", "--only", ",".join(names), "--no-plots", "--out", str(gdir)]  # fmt: skip
        cmd += ["--reps", "1", "--regimes", "testbed"] if dry else ["--reps", "2"]
        limit = budget.grant("e2e", RESERVE_S["e2e"])
        if groups and not dry and limit < 0.8 * groups[0]["step"]["seconds"]:
            limit = 0  # a later group would not finish in what is left: leave the time to the demo
        step = run(f"end to end, CUDA endpoint, group {i + 1}", cmd, limit, out / f"gpu-e2e-{i + 1}.log")
        if groups and step["rc"] == 124:
            step["skipped"] = "budget (timed out)"  # the first group's results stand
        groups.append({"workloads": names, "step": step, "report": _json(gdir / "latest.json")})
    e2e = e2e_summary(groups)
    (out / "gpu_e2e.json").write_text(json.dumps({"summary": e2e, "reports": [g["report"] for g in groups]}, indent=1))
    e2e_steps = [g["step"] for g in groups]
    steps["e2e"] = {
        "rc": next(
            (s["rc"] for s in e2e_steps if s["rc"] not in (0, None) and not s.get("skipped")),
            0 if e2e["ran"] else None,
        ),
        "seconds": round(sum(s["seconds"] for s in e2e_steps), 1),
        "log": ", ".join(s["log"] for s in e2e_steps),
        **({"skipped": "budget"} if not e2e["ran"] and all(s.get("skipped") for s in e2e_steps) else {}),
    }

    demo_cmd = [*([*fake, "-m"] if dry else [py, "-m"]), "bench.demo", "--endpoint", "cuda"]
    demo_cmd += ["--json", str(out / "gpu_demo.json")]
    steps["demo"] = run("demo, CUDA endpoint", demo_cmd, budget.grant("demo"), out / "gpu-demo.log")

    summary = {
        "dry_run": dry,
        "device": info,
        "steps": steps,
        "tests": junit_counts(out / "gpu-tests.xml") if not dry else {"collected": steps["tests"]["rc"] == 0},
        "kernels": _json(out / "gpu_kernels.json"),
        "e2e": e2e,
        "demo": _json(out / "gpu_demo.json"),
        "seconds": round(time.monotonic() - budget.t0, 1),
        "budget_s": TOTAL_S,
        "json": str(out / "gpu-check.json"),
    }
    (out / "gpu-check.json").write_text(json.dumps(summary, indent=1, default=str))
    print_summary(summary)
    ok = all(s["rc"] == 0 for s in steps.values() if not s.get("skipped")) and steps["tests"]["rc"] == 0
    ok = ok and bool(e2e["ran"]) and not steps["kernels"].get("skipped")
    print("gpu-check: " + ("PASS" if ok else "FAIL") + (" (dry run)" if dry else ""))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
