"""`make gpu-check` without a GPU: its plan (steps, budget, the workloads it replays) is consistent, its
summary reads the reports the device run writes, and `--dry-run` runs every step against the fake GPU
(slow: it starts real daemons and the bench harness), so no typo survives to the device run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import gpu_check  # noqa: E402
from bench import workloads as W  # noqa: E402


def test_plan_fits_the_budget_and_names_real_things() -> None:
    assert gpu_check.TOTAL_S < 300, "the whole check must finish in under 5 minutes"
    quick = {t.name for t in W.suite("quick")}
    named = [w for g in gpu_check.GROUPS for w in g]
    assert sorted(named) == sorted(quick), "the groups are the quick suite, each workload once"
    for path in (*gpu_check.GPU_TESTS, gpu_check.FAKE_RUN, "bench/gpu_kernels.py"):
        assert (ROOT / path).exists(), path
    assert os.access(ROOT / "scripts" / "gpu-check.sh", os.R_OK)


def _workload(pllm: float, naive: float, bound: float, target: float) -> dict[str, Any]:
    return {
        "overhead_pct": {"pipellm": pllm, "naive": naive},
        "bound_pct": bound,
        "target_pct": target,
        "pipellm": {"hit_rate": 0.99, "counters": {"staged": 12.0}, "endpoint": {"verified": 40.0}},
    }


def test_summary_merges_groups_and_judges_targets(capsys: pytest.CaptureFixture[str]) -> None:
    ok_step = {"rc": 0, "seconds": 12.0, "log": "x"}
    groups = [
        {
            "workloads": ("a", "b"),
            "step": ok_step,
            "report": {
                "endpoint": "cuda",
                "verify": "every message",
                "capacity": {"used": {"aggregate_bps": 9.5e10}},
                "scale": {"testbed": {"speed": 1.4}},
                "workloads": {"a@testbed": _workload(3.0, 40.0, 0.0, 5.0), "a@capacity": _workload(9.0, 8.0, 0, 5.0)},
            },
        },
        {"workloads": ("c",), "step": {"rc": None, "seconds": 0.0, "log": "y", "skipped": "budget"}, "report": {}},
    ]
    e2e = gpu_check.e2e_summary(groups)
    assert e2e["ran"] == ["a"] and e2e["not_run"] == ["b", "c"]
    assert (e2e["met"], e2e["judged"]) == (1, 2)
    assert e2e["workloads"]["a@capacity"]["met"] is False  # above target and above naive
    assert e2e["runs"][0]["capacity_gbps"] == 95.0 and e2e["runs"][1]["skipped"] == "budget"
    summary = {
        "dry_run": False,
        "device": {"device": "X"},
        "steps": {"tests": ok_step, "e2e": ok_step},
        "tests": {"tests": 3},
        "kernels": {
            "results": [
                {"size": "1 MiB x16", "op": "decrypt (batch)", "gbps": 99.0, "copy_gbps": 900.0, "ratio_to_copy": 0.11}
            ],
            "targets": {
                "decrypt 1 MiB x16 (batch)": {"gbps": 99.0, "target_gbps": 64.0, "met": True, "ratio_to_copy": 0.11}
            },
        },
        "e2e": e2e,
        "demo": {"hit_rate": 0.8, "time_vs_plain": {"pipellm": 1.1, "naive": 1.3}, "modes": {"pipellm": {"staged": 4}}},
        "seconds": 100.0,
        "json": "out/gpu-check.json",
    }
    gpu_check.print_summary(summary)
    text = capsys.readouterr().out
    assert "targets met on 1/2" in text and "a@capacity" in text and "MISSED" in text and ">= 64 GB/s" in text


@pytest.mark.slow
def test_dry_run_runs_every_step(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'client'}:{ROOT}", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry_run"] and set(report["steps"]) == {"tests", "kernels", "e2e", "demo"}
    assert all(s["rc"] == 0 for s in report["steps"].values())
    rows = {(r["op"], r["messages"]) for r in report["kernels"]["results"]}
    assert {("decrypt (batch)", 16), ("encrypt (batch)", 64), ("decrypt", 1), ("decrypt (64 calls)", 64)} <= rows
    assert set(report["kernels"]["targets"]) == {"decrypt 1 MiB x16 (batch)", "decrypt 64 MiB"}
    e2e = report["e2e"]
    assert e2e["ran"] == sorted(g[0] for g in gpu_check.GROUPS) and e2e["judged"] == len(gpu_check.GROUPS)
    assert all(r["endpoint"] == "cuda" for r in e2e["runs"])
    assert report["demo"]["modes"]["pipellm"]["checked"] > 0
    assert "gpu-check: PASS (dry run)" in proc.stdout
