"""LoRA adapters hot-swapped through a real pipellmd: the same logits and tokens as peft loading them itself.

Adapters are random (`init_lora_weights=False`, seeded) on a tiny OPT built from its config, saved with
`save_pretrained` and read back with peft's own loader; the reference model loads the same directories with
`PeftModel.from_pretrained` / `load_adapter` and switches with `set_adapter`. Each adapter targets every
linear layer at rank 16 (576 KiB, above the daemon's default small-transfer threshold, as real adapters
-- about 2 MiB x rank for a 7B model -- are), and the three differ in lora_alpha, so the scaling must follow
each swap.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing is downloaded
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from pipellm_client import Client, InvalidArgument  # noqa: E402
from pipellm_client.integrations.peft import LoraAdapters  # noqa: E402
from tiny_models import VOCAB, tiny_opt  # noqa: E402
from torch_gpu import real_gpu  # noqa: E402

pytestmark = [
    pytest.mark.integrations,
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # peft warns about random (non-identity) LoRA init
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # transformers deprecations inside peft
]

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ALPHAS = {"a": 32, "b": 16, "c": 8}


def base_model() -> Any:
    return tiny_opt(99)


def save_adapter(base: Any, root: Path, name: str, seed: int, *, rank: int = 16, alpha: int = 32) -> str:
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, lora_dropout=0.0)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    path = str(root / name)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, str]]:
    base = base_model()
    root = tmp_path_factory.mktemp("adapters")
    dirs = {n: save_adapter(base, root, n, seed=10 + i, alpha=a) for i, (n, a) in enumerate(ALPHAS.items())}
    dirs["wide"] = save_adapter(base, root, "wide", seed=20, rank=32, alpha=64)
    return base, dirs


def batch() -> dict[str, Any]:
    ids = torch.randint(4, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def reference(base: Any, dirs: dict[str, str], names: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Logits and greedy tokens per adapter, loaded the ordinary peft way."""
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0]).eval()
    for n in names[1:]:
        ref.load_adapter(dirs[n], adapter_name=n)
    logits, tokens = {}, {}
    with torch.no_grad():
        for n in names:
            ref.set_adapter(n)
            logits[n] = ref(**batch()).logits
            tokens[n] = ref.generate(**batch(), max_new_tokens=3, do_sample=False, pad_token_id=1)
    return logits, tokens


def test_hot_swapping_matches_peft_and_hits_with_hints(daemon, adapters) -> None:
    base, dirs = adapters
    names = list(ALPHAS)
    want_logits, want_tokens = reference(base, dirs, names)
    assert not torch.equal(want_logits["a"], want_logits["b"])
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["c"]).eval()  # slot "default"
    order = ["a", "b", "c", "b", "a", "c", "a", "b", "c", "c", "a", "b", "a"]
    with Client(daemon.socket) as client, client.open_session(name="lora") as s:
        mgr = LoraAdapters(s, model)
        for n in names:
            mgr.register(n, dirs[n])
        assert all(a.region.sealed for a in mgr.adapters.values())
        before = None
        for i, n in enumerate(order):
            mgr.load(n)
            if i == 2:  # each adapter has been loaded once: from here on they are repeats
                before = s.status().counters
            if i + 1 < len(order):
                mgr.hint([order[i + 1]])  # the next batch's adapter, known mid-decode
            with torch.no_grad():
                assert torch.equal(model(**batch()).logits, want_logits[n]), (i, n)
        after = s.status().counters
        with torch.no_grad():
            for n in ("b", "a"):
                mgr.load(n)
                assert torch.equal(
                    model.generate(**batch(), max_new_tokens=3, do_sample=False, pad_token_id=1), want_tokens[n]
                )
        assert before is not None
        hits, skips = after.hits - before.hits, after.skips - before.skips
        judged = (after.hits + after.misses + after.skips + after.late) - (
            before.hits + before.misses + before.skips + before.late
        )
        loads = sum(1 for i in range(3, len(order)) if order[i] != order[i - 1])  # "c","c": resident, no copy
        assert judged == loads
        # Every hinted load is served from ciphertext made ahead: no miss, none late. One of them may be a
        # skip, as timing decides: when the load of "b" (i=11) finds its record not yet in the delivery ring
        # (a busy host: the hint's encryption or publication still pending), it takes a commit, and that
        # commit's refill, with no intent left, queues the learned cycle's guess "c", "a", ... The hint "a"
        # then finds "a" queued behind "c"; burning "c" costs less than a rotation and encrypting the rest
        # again (Pipeline._rotation_pays), so the load of "a" burns it and uses the ciphertext behind it.
        # Only that load follows a confident cycle that its hint contradicts.
        assert hits + skips == judged and skips <= 1, (hits, skips, judged)
        assert mgr.loads == loads + 3 + 2
        mgr.close()


def test_incompatible_adapter_needs_its_own_slot(daemon, adapters) -> None:
    base, dirs = adapters
    want, _ = reference(base, dirs, ["a", "wide"])
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"]).eval()
    with Client(daemon.socket) as client, client.open_session(name="lora-slots") as s:
        mgr = LoraAdapters(s, model)
        mgr.register("a", dirs["a"])
        mgr.register("wide", dirs["wide"])
        with pytest.raises(InvalidArgument, match="other LoRA tensors"):
            mgr.load("wide")  # rank 32 into the rank-16 slot
        for _ in range(2):
            for name, slot in (("wide", "wide-slot"), ("a", "default")):
                mgr.load(name, slot)
                with torch.no_grad():
                    assert torch.equal(model(**batch()).logits, want[name]), name
        with pytest.raises(InvalidArgument, match="not registered"):
            mgr.load("nope")
        mgr.close()
        assert not s.core.regions


# -- the CUDA endpoint ---------------------------------------------------------------------------------


def test_cuda_endpoint_emulated(daemon, adapters, fake_gpu) -> None:
    """Hot-swapping through a session with endpoint="cuda": the slot buffer is the endpoint's device memory,
    each load decrypted and verified there; same logits as peft, hinted loads hit."""
    base, dirs = adapters
    names = list(ALPHAS)
    want_logits, _ = reference(base, dirs, names)
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["c"]).eval()
    order = ["a", "b", "c", "a", "b", "c", "b"]
    with Client(daemon.socket) as client, client.open_session(name="lora-cuda", endpoint="cuda") as s:
        ep = s.core.endpoint
        assert ep.kind == "cuda"
        mgr = LoraAdapters(s, model)
        for n in names:
            mgr.register(n, dirs[n])
        before = None
        for i, n in enumerate(order):
            mgr.load(n)
            if i == 2:
                before = s.status().counters
            if i + 1 < len(order):
                mgr.hint([order[i + 1]])
            with torch.no_grad():
                assert torch.equal(model(**batch()).logits, want_logits[n]), (i, n)
        after = s.status().counters
        assert before is not None
        hits, skips = after.hits - before.hits, after.skips - before.skips
        judged = (after.hits + after.misses + after.skips + after.late) - (
            before.hits + before.misses + before.skips + before.late
        )
        # As in the test above: all made ahead; the last load ("b", the hint against the cycle's "a") may be
        # a skip when the load before it took a commit.
        assert judged == len(order) - 3 and hits + skips == judged and skips <= 1, (hits, skips, judged)
        assert ep.accepted > 0 and ep.dead is None
        mgr.close()


def test_parameters_must_be_where_the_endpoint_writes(daemon, adapters) -> None:
    base, dirs = adapters
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["a"]).eval()
    with Client(daemon.socket) as client, client.open_session(name="lora-where") as s:
        mgr = LoraAdapters(s, model)
        mgr.register("a", dirs["a"])
        name, first = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
        owner, _, attr = name.rpartition(".")
        elsewhere = torch.nn.Parameter(torch.empty(first.shape, device="meta"))  # where no endpoint writes
        model.get_submodule(owner).register_parameter(attr, elsewhere)
        with pytest.raises(InvalidArgument, match="is on meta, but this session's cpu endpoint writes cpu"):
            mgr.load("a")
        mgr.close()


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu()[0], reason=f"needs a CUDA GPU for torch and CuPy: {real_gpu()[1]}")
def test_on_a_real_gpu(daemon, adapters) -> None:
    """A PEFT model on the GPU, adapters hot-swapped through a CUDA session: logits equal to peft loading
    the same adapters on the same GPU."""
    base, dirs = adapters
    gpu = torch.device("cuda", 0)
    names = list(ALPHAS)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0]).to(gpu).eval()
    for n in names[1:]:
        ref.load_adapter(dirs[n], adapter_name=n)
    inp = {k: v.to(gpu) for k, v in batch().items()}
    want = {}
    with torch.no_grad():
        for n in names:
            ref.set_adapter(n)
            want[n] = ref(**inp).logits
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs["c"]).to(gpu).eval()
    with Client(daemon.socket) as client, client.open_session(name="lora-gpu", endpoint="cuda", device=0) as s:
        mgr = LoraAdapters(s, model)
        for n in names:
            mgr.register(n, dirs[n])
        for n in ["a", "b", "c", "a"]:
            mgr.load(n)
            with torch.no_grad():
                assert torch.equal(model(**inp).logits, want[n]), n
        mgr.close()
