"""The integrations with and without PipeLLM, measured in one run: accelerate offloading, vLLM-style KV
swapping (V0 LIFO and V1 FIFO) and PEFT LoRA hot-swapping.

    python bench/integrations.py [--reps N] [--only accelerate,vllm-v0,vllm-v1,peft] [--json PATH]

Arms, each with the same code and inputs, run interleaved (one repetition of every arm, in rotating order,
then the next repetition), medians reported:

- direct   the library's own path, no PipeLLM (accelerate's fetch, torch copies, peft's in-place hot-swap);
- plain    through pipellmd in "plain" mode: the channel's machinery with no encryption (H2D only; D2H is
           always encrypted, so it is not shown for the swap workloads);
- naive    pipellmd in "naive" mode: every transfer encrypted on demand, in the critical path, one worker
           (what the CUDA driver does in CC mode);
- pipellm  pipellmd predicting and encrypting ahead.

"x direct" is an arm's median over direct's. Hit rates come from the session counters over the timed
repetitions. The endpoint verifies every message (verify="all"). Caveat: the "device" is the CPU endpoint,
so decryption, which a GPU's copy engine does at link speed, runs on this host's cores in the critical path,
and the direct arm moves nothing over a link (its execution device is the CPU): the ratios bound the CPU
cost of the confidential path on this machine, not what a CC GPU would see.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import pipellm_client  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from pipellm_client import Client, Session  # noqa: E402

from pipellm_daemon.launcher import DaemonProcess  # noqa: E402

MODES = ("plain", "naive", "pipellm")
MIB = 1 << 20

SLACK_S = 0.02  # between swap-out and swap-in a real engine runs decode steps: the daemon's time to work ahead


class Timer:
    """Phases of one repetition (e.g. swap-out, swap-in); time outside any phase (slack) is not counted."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0


Step = Callable[[Timer], None]


def counters_delta(s: Session | None, before: Any) -> dict[str, int]:
    if s is None or before is None:
        return {}
    after = s.status().counters
    keys = ("hits", "misses", "skips", "late", "stale", "small_transfers", "chunks")
    return {k: getattr(after, k) - getattr(before, k) for k in keys}


def hit_rate(d: dict[str, int]) -> float | None:
    judged = d.get("hits", 0) + d.get("misses", 0) + d.get("skips", 0) + d.get("late", 0)
    return d["hits"] / judged if judged else None


class Arm:
    """One way of running a workload: `step(timer)` is timed by phase; `session` (if any) gives the counters."""

    def __init__(self, name: str, step: Step, session: Session | None = None) -> None:
        self.name = name
        self.step = step
        self.session = session
        self.reps: list[dict[str, float]] = []
        self.before: Any = None


def run_interleaved(arms: list[Arm], reps: int, warmup: int) -> dict[str, dict[str, Any]]:
    for i in range(warmup + reps):
        if i == warmup:
            for a in arms:
                a.before = a.session.status().counters if a.session is not None else None
        order = arms[i % len(arms) :] + arms[: i % len(arms)]
        for a in order:
            t = Timer()
            a.step(t)
            if i >= warmup:
                t.phases["total"] = sum(t.phases.values())
                a.reps.append(t.phases)

    def medians(a: Arm) -> dict[str, float]:
        return {k: statistics.median(r[k] for r in a.reps) for k in a.reps[0]}

    direct = medians(next(a for a in arms if a.name == "direct"))
    out: dict[str, dict[str, Any]] = {}
    for a in arms:
        med = medians(a)
        d = counters_delta(a.session, a.before)
        out[a.name] = {
            "median_ms": {k: v * 1e3 for k, v in med.items()},
            "x_direct": {k: v / direct[k] for k, v in med.items()},
            "hit_rate": hit_rate(d),
            "counters": d,
        }
    return out


def report(title: str, note: str, rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n== {title}  ({note})")
    phases = list(next(iter(rows.values()))["median_ms"])
    head = "".join(f"{p + ' ms':>14}{'x':>7}" for p in phases)
    print(f"   {'arm':<18}{head}{'hit rate':>10}   counters")
    for name, r in rows.items():
        cells = "".join(f"{r['median_ms'][p]:>14.2f}{r['x_direct'][p]:>7.2f}" for p in phases)
        hr = "-" if r["hit_rate"] is None else f"{r['hit_rate'] * 100:.1f}%"
        c = r["counters"]
        cs = " ".join(f"{k}={v}" for k, v in c.items() if v) if c else ""
        print(f"   {name:<18}{cells}{hr:>10}   {cs}")


@contextlib.contextmanager
def sessions(daemons: dict[str, DaemonProcess], name: str, swap_order: str = "fifo") -> Iterator[dict[str, Session]]:
    with contextlib.ExitStack() as stack:
        out = {}
        for mode, d in daemons.items():
            client = stack.enter_context(Client(d.socket))
            session = client.open_session(name=f"{name}-{mode}", swap_order=swap_order, allow_plain=mode == "plain")
            out[mode] = stack.enter_context(session)
        yield out


def _small_opt(*, hidden: int, heads: int) -> Any:
    """A 4-layer OPT with random weights (seeded), vocabulary 8192, in eval mode."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.OPTConfig(
        vocab_size=8192,
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        ffn_dim=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=heads,
        max_position_embeddings=128,
    )
    return transformers.OPTForCausalLM(cfg).eval()


# -- accelerate --------------------------------------------------------------------------------------
def bench_accelerate(daemons: dict[str, DaemonProcess], reps: int) -> dict[str, dict[str, Any]]:
    import accelerate
    from pipellm_client.integrations import accelerate as pa

    base = _small_opt(hidden=768, heads=12)
    ids = torch.randint(4, 8192, (1, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = base(**batch).logits
    models = {}
    for arm in ("direct", *MODES):
        m = copy.deepcopy(base)
        accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
        models[arm] = m
    with sessions(daemons, "accelerate") as ss:
        for mode, s in ss.items():
            pa.enable(models[mode], s)

        def step_for(arm: str) -> Step:
            def step(t: Timer) -> None:
                with t.phase("forward"), torch.no_grad():
                    out = models[arm](**batch).logits
                if not torch.equal(out, want):
                    raise SystemExit(f"accelerate/{arm}: logits differ")

            return step

        arms = [Arm("direct", step_for("direct"))] + [Arm(m, step_for(m), ss[m]) for m in MODES]
        rows = run_interleaved(arms, reps, warmup=2)
        nbytes = models["pipellm"]._pipellm_offload.nbytes
        for m in MODES:
            pa.disable(models[m])
    report("accelerate cpu_offload, OPT 4 x 768, one forward of 32 tokens", f"{nbytes / MIB:.0f} MiB fetched", rows)
    return rows


# -- vLLM swapping -----------------------------------------------------------------------------------
LAYERS, GPU_BLOCKS, SHAPE = 4, 64, (16, 32, 128)  # Llama-2-7B-shaped blocks: 128 KiB per copy in fp16
REQS = {i: 4 for i in range(1, 9)}  # 8 requests of 4 blocks: 8 x 4 x 4 layers x K,V = 256 copies, 32 MiB
USED = 4 * len(REQS)


def _random_caches(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(-(2**15), 2**15, (2, GPU_BLOCKS, *SHAPE), dtype=torch.int16, generator=g).view(torch.float16)
        for _ in range(LAYERS)
    ]


def _torch_swap(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
    """vLLM's swap_blocks on plain tensors: one copy per block, K then V."""
    for kv in (0, 1):
        for s, d in pairs:
            dst[kv, d].copy_(src[kv, s])


def _check_caches(got: list[torch.Tensor], want: list[torch.Tensor], failure: str) -> None:
    """Bit-exact comparison of KV caches (as int16: NaN payloads compare too); SystemExit(failure) if not."""
    if not all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(got, want, strict=True)):
        raise SystemExit(failure)


def bench_vllm_v0(daemons: dict[str, DaemonProcess], reps: int) -> dict[str, dict[str, Any]]:
    from pipellm_client.integrations.vllm_swap import CacheEngine

    out_pairs = {r: [(b, b) for b in range((r - 1) * 4, r * 4)] for r in REQS}  # request r: blocks 4(r-1)..
    with (
        sessions(daemons, "v0", swap_order="lifo") as ss,
        Client(daemons["pipellm"].socket) as extra,
        extra.open_session(name="v0-pipellm-unordered", swap_order="lifo") as unordered,
    ):
        dev = {name: _random_caches(1) for name in ("direct", "pipellm-unordered", *MODES)}
        want = [c.clone() for c in dev["direct"]]
        cpu_plain = [torch.empty_like(c) for c in dev["direct"]]
        engines = {m: CacheEngine(ss[m], dev[m], GPU_BLOCKS) for m in MODES if m != "plain"}
        engines["pipellm-unordered"] = CacheEngine(unordered, dev["pipellm-unordered"], GPU_BLOCKS, ordered=False)

        def check(name: str) -> None:
            _check_caches(dev[name], want, f"vllm-v0/{name}: caches differ after resume")

        def direct(t: Timer) -> None:
            with t.phase("swap-out"):
                for r in sorted(REQS, reverse=True):
                    for c, p in zip(dev["direct"], cpu_plain, strict=True):
                        _torch_swap(c, p, out_pairs[r])
            for c in dev["direct"]:
                c[:, :USED].zero_()  # the preempted requests' blocks
            time.sleep(SLACK_S)
            with t.phase("swap-in"):
                for r in sorted(REQS):
                    for c, p in zip(dev["direct"], cpu_plain, strict=True):
                        _torch_swap(p, c, out_pairs[r])
            check("direct")

        def step_for(name: str) -> Step:
            eng = engines[name]

            def step(t: Timer) -> None:
                with t.phase("swap-out"):
                    for r in sorted(REQS, reverse=True):  # newest preempted first
                        eng.swap_out(torch.tensor(out_pairs[r]), group=r)
                for c in dev[name]:
                    c[:, :USED].zero_()  # the preempted requests' blocks
                time.sleep(SLACK_S)
                with t.phase("swap-in"):
                    for r in sorted(REQS):  # FCFS swap-in
                        eng.swap_in(torch.tensor(out_pairs[r]))
                check(name)

            return step

        arms = [Arm("direct", direct)]
        arms += [Arm(m, step_for(m), ss[m]) for m in ("naive", "pipellm")]
        arms += [Arm("pipellm-unordered", step_for("pipellm-unordered"), unordered)]
        rows = run_interleaved(arms, reps, warmup=1)
    report(
        "vLLM V0 preempt + resume (LIFO groups)",
        f"{len(REQS)} requests x 4 blocks x {LAYERS} layers, 128 KiB copies, swap-out + swap-in",
        rows,
    )
    return rows


def bench_vllm_v1(daemons: dict[str, DaemonProcess], reps: int) -> dict[str, dict[str, Any]]:
    from pipellm_client.integrations.vllm_swap import BlockIDs, OffloadingHandlers

    blocks = sorted(b for r in REQS for b in range((r - 1) * 4, r * 4))
    with sessions(daemons, "v1", swap_order="fifo") as ss:
        dev = {name: _random_caches(2) for name in ("direct", "naive", "pipellm")}
        want = [c.clone() for c in dev["direct"]]
        cpu_plain = [torch.empty_like(c) for c in dev["direct"]]
        handlers = {m: OffloadingHandlers(ss[m], dev[m], GPU_BLOCKS) for m in ("naive", "pipellm")}
        jobs = iter(range(1 << 30))

        def check(name: str) -> None:
            _check_caches(dev[name], want, f"vllm-v1/{name}: caches differ after load")

        def direct(t: Timer) -> None:
            with t.phase("store"):
                for c, p in zip(dev["direct"], cpu_plain, strict=True):
                    _torch_swap(c, p, [(b, b) for b in blocks])
            for c in dev["direct"]:
                c[:, :USED].zero_()  # the stored blocks, reused by other requests
            time.sleep(SLACK_S)
            with t.phase("load"):
                for c, p in zip(dev["direct"], cpu_plain, strict=True):
                    _torch_swap(p, c, [(b, b) for b in blocks])
            check("direct")

        def step_for(name: str) -> Step:
            h = handlers[name]

            def step(t: Timer) -> None:
                with t.phase("store"):
                    for r in REQS:  # one store job per request
                        ids = list(range((r - 1) * 4, r * 4))
                        h.gpu_to_cpu_handler.transfer_async(next(jobs), (BlockIDs.gpu(ids), BlockIDs.cpu(ids)))
                    pending = len(REQS)
                    while pending:
                        pending -= len(h.gpu_to_cpu_handler.get_finished())
                for c in dev[name]:
                    c[:, :USED].zero_()  # the stored blocks, reused by other requests
                time.sleep(SLACK_S)
                with t.phase("load"):
                    for r in REQS:  # prefix hits load them back, FIFO
                        ids = list(range((r - 1) * 4, r * 4))
                        h.cpu_to_gpu_handler.transfer_async(next(jobs), (BlockIDs.cpu(ids), BlockIDs.gpu(ids)))
                    h.cpu_to_gpu_handler.get_finished()
                check(name)

            return step

        arms = [Arm("direct", direct)] + [Arm(m, step_for(m), ss[m]) for m in ("naive", "pipellm")]
        rows = run_interleaved(arms, reps, warmup=1)
    report("vLLM V1 offloading store + load (FIFO)", f"{len(blocks)} blocks x {LAYERS} layers, 128 KiB copies", rows)
    return rows


# -- PEFT --------------------------------------------------------------------------------------------
def bench_peft(daemons: dict[str, DaemonProcess], reps: int) -> dict[str, dict[str, Any]]:
    import peft
    from peft.utils.hotswap import hotswap_adapter_from_state_dict
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights
    from pipellm_client.integrations.peft import LoraAdapters

    base = _small_opt(hidden=1024, heads=16)
    targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    names = ["a", "b", "c"]
    root = Path(tempfile.mkdtemp(prefix="pipellm-bench-lora-"))
    for i, n in enumerate(names):
        torch.manual_seed(10 + i)
        lc = peft.LoraConfig(r=64, lora_alpha=16 * (i + 1), target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(base), lc).save_pretrained(str(root / n))
    ids = torch.randint(4, 8192, (1, 16), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "a"), adapter_name="a").eval()
    for n in names[1:]:
        ref.load_adapter(str(root / n), adapter_name=n)
    want = {}
    with torch.no_grad():
        for n in names:
            ref.set_adapter(n)
            want[n] = ref(**batch).logits
    del ref
    models = {
        arm: peft.PeftModel.from_pretrained(copy.deepcopy(base), str(root / "a")).eval()
        for arm in ("direct", "naive", "pipellm")
    }
    states = {n: load_peft_weights(str(root / n), device="cpu") for n in names}
    configs = {n: peft.PeftConfig.from_pretrained(str(root / n)) for n in names}
    nbytes = sum(v.numel() * v.element_size() for v in states["a"].values())
    with sessions({m: daemons[m] for m in ("naive", "pipellm")}, "peft") as ss:
        mgrs = {m: LoraAdapters(s, models[m]) for m, s in ss.items()}
        for mgr in mgrs.values():
            for n in names:
                mgr.register(n, str(root / n))
        cursor = {arm: 0 for arm in models}

        def forward(t: Timer, arm: str, n: str) -> None:
            with t.phase("forward"), torch.no_grad():
                out = models[arm](**batch).logits
            if not torch.equal(out, want[n]):
                raise SystemExit(f"peft/{arm}: logits differ for adapter {n}")

        def direct(t: Timer) -> None:
            n = names[cursor["direct"] % 3]
            cursor["direct"] += 1
            with t.phase("load"):  # peft's own hot-swap from the host copy
                sd = _insert_adapter_name_into_state_dict(states[n], adapter_name="default", parameter_prefix="lora_")
                hotswap_adapter_from_state_dict(models["direct"], sd, "default", configs[n])
            forward(t, "direct", n)

        def step_for(arm: str) -> Step:
            mgr = mgrs[arm]

            def step(t: Timer) -> None:
                i = cursor[arm]
                cursor[arm] += 1
                n = names[i % 3]
                with t.phase("load"):
                    mgr.load(n)
                mgr.hint([names[(i + 1) % 3]])  # the next batch's adapter, known mid-decode
                forward(t, arm, n)

            return step

        arms = [Arm("direct", direct)] + [Arm(m, step_for(m), ss[m]) for m in ("naive", "pipellm")]
        rows = run_interleaved(arms, reps, warmup=3)
    report("PEFT LoRA hot-swap + one forward, round robin over 3 adapters", f"{nbytes / MIB:.1f} MiB per adapter", rows)
    return rows


BENCHES: dict[str, Callable[[dict[str, DaemonProcess], int], dict[str, dict[str, Any]]]] = {
    "accelerate": bench_accelerate,
    "vllm-v0": bench_vllm_v0,
    "vllm-v1": bench_vllm_v1,
    "peft": bench_peft,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--only", default=",".join(BENCHES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a pipellmd setting for all three daemons"
    )
    args = ap.parse_args()
    settings: dict[str, Any] = {"workers": args.workers, "pool_bytes": 1 << 30, "small_transfer_threshold": 0}
    for kv in args.set:
        k, _, v = kv.partition("=")
        settings[k] = v
    torch.set_num_threads(1)  # the daemon's workers get the other cores
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    print(
        f"pipellm integrations bench: {os.cpu_count()} CPUs, daemon workers={args.workers}, reps={args.reps}, "
        f"torch threads=1, every message verified; pipellmd settings {settings}"
    )
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        daemons = {mode: stack.enter_context(DaemonProcess(mode=mode, **settings)) for mode in MODES}
        for name in chosen:
            results[name] = BENCHES[name](daemons, args.reps)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
