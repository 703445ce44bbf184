"""accelerate CPU offloading through a real pipellmd: same logits, same greedy tokens, predicted fetches.

Models are built from configs with seeded random weights (nothing is downloaded). Dimensions are small but
chosen so the linear layers' blocks are >= 256 KiB, the daemon's default small-transfer threshold: those
are the fetches the speculative channel serves, and the hit rate is measured on them. Layer norms and
biases-only modules are smaller and take the second channel (encrypted on demand, never speculated).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing is downloaded
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from pipellm_client import Client, InvalidArgument  # noqa: E402
from pipellm_client.integrations import accelerate as pipellm_accelerate  # noqa: E402
from tiny_models import VOCAB, tiny_llama, tiny_opt  # noqa: E402
from torch_gpu import real_gpu  # noqa: E402

pytestmark = [pytest.mark.integrations, pytest.mark.integration]

FORWARDS = 6  # the first fetches on demand; the hit rate is measured over the other five


def build(family: str) -> Any:
    if family == "opt":
        return tiny_opt(1234)
    return tiny_llama(1234, tied=family == "llama-tied")


def offload(model: Any, how: str) -> None:
    """Offload every weight to the CPU with accelerate; the execution device is the CPU (the CPU endpoint's
    "GPU"). `dispatch_model` treats a main device equal to "cpu" as not offloading, hence torch.device."""
    cpu = torch.device("cpu")
    if how == "cpu_offload":
        accelerate.cpu_offload(model, execution_device=cpu)
    else:
        device_map = {name: "cpu" for name, _ in model.named_children()}  # accelerate cannot extract "" here
        accelerate.dispatch_model(model, device_map=device_map, main_device=cpu, force_hooks=True)


def inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(4, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def generate(model: Any, batch: dict[str, Any]) -> Any:
    return model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=1)


def judged(c: Any) -> int:
    return int(c.hits + c.misses + c.skips + c.late)


def offloaded_with_reference(family: str, how: str) -> tuple[Any, dict[str, Any], Any, Any]:
    """A fresh model, its inputs, and its logits and tokens before offloading; then the model offloaded."""
    model = build(family)
    batch = inputs()
    with torch.no_grad():
        want_logits = model(**batch).logits
        want_tokens = generate(model, batch)
    offload(model, how)
    return model, batch, want_logits, want_tokens


@pytest.mark.parametrize(
    ("family", "how"),
    [("opt", "cpu_offload"), ("llama", "dispatch_model"), ("opt", "dispatch_model"), ("llama-tied", "cpu_offload")],
)
def test_offloaded_model_is_identical_and_predicted(daemon, family: str, how: str) -> None:
    model, batch, want_logits, want_tokens = offloaded_with_reference(family, how)
    with Client(daemon.socket) as client, client.open_session(name=f"acc-{family}") as s:
        state = pipellm_accelerate.enable(model, s)
        assert state.region.sealed
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, want_logits)  # forward 1: learns (and declares) the order
            before = s.status().counters
            for _ in range(FORWARDS - 1):
                assert torch.equal(model(**batch).logits, want_logits)
            after = s.status().counters
            assert torch.equal(generate(model, batch), want_tokens)
        hits = after.hits - before.hits
        total = judged(after) - judged(before)
        assert total >= 5 * (FORWARDS - 1), "the big fetches must go through the speculative channel"
        assert hits / total >= 0.99, (hits, total, after)
        assert state.stats.fetches >= len(state.blocks) * FORWARDS
        assert state.stats.declared > 0

        pipellm_accelerate.disable(model)
        assert all("pre_forward" not in b.hook.__dict__ for b in state.blocks)
        commits = s.status().counters.commits
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, want_logits)
            assert torch.equal(generate(model, batch), want_tokens)
        assert s.status().counters.commits == commits, "disabled: nothing may go through PipeLLM any more"
        assert state.region.id not in s.core.regions


@pytest.mark.daemon_settings(small_transfer_threshold=0)
def test_cycle_is_learned_without_declared_intents(daemon) -> None:
    """With every fetch speculated (threshold 0) and nothing declared, the daemon's cycle predictor alone
    serves the fetches once it has seen the order twice."""
    model = build("opt")
    batch = inputs()
    with torch.no_grad():
        want = model(**batch).logits
    offload(model, "cpu_offload")
    with Client(daemon.socket) as client, client.open_session(name="acc-cycle") as s:
        state = pipellm_accelerate.enable(model, s, declare=False)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(**batch).logits, want)
            before = s.status().counters
            for _ in range(4):
                assert torch.equal(model(**batch).logits, want)
            after = s.status().counters
        assert after.small_transfers == 0
        hits, total = after.hits - before.hits, judged(after) - judged(before)
        assert total == 4 * sum(-(-b.layout.nbytes // (1 << 20)) for b in state.blocks)  # 1 MiB chunks
        assert hits / total >= 0.99, (hits, total)
        assert state.stats.declared == 0
        state.disable()


def test_enable_refuses_what_it_cannot_serve(daemon) -> None:
    model = build("opt")
    with Client(daemon.socket) as client, client.open_session(name="acc-refuse") as s:
        with pytest.raises(InvalidArgument, match="no offloaded weights"):
            pipellm_accelerate.enable(model, s)
        offloaded = copy.deepcopy(model)
        offload(offloaded, "cpu_offload")
        pipellm_accelerate.enable(offloaded, s)
        with pytest.raises(InvalidArgument, match="already enabled"):
            pipellm_accelerate.enable(offloaded, s)
        pipellm_accelerate.disable(offloaded)
        pipellm_accelerate.disable(offloaded)  # idempotent
        assert not s.core.regions


# -- the CUDA endpoint ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "how"), [("opt", "cpu_offload"), ("llama", "dispatch_model")])
def test_cuda_endpoint_emulated(daemon, fake_gpu, family: str, how: str) -> None:
    """The same model through a session with endpoint="cuda": every fetch decrypted and verified by the
    (emulated) GPU into a buffer the endpoint allocated; same logits and tokens, same hit rate."""
    model, batch, want_logits, want_tokens = offloaded_with_reference(family, how)
    with Client(daemon.socket) as client, client.open_session(name=f"acc-cuda-{family}", endpoint="cuda") as s:
        ep = s.core.endpoint
        assert ep.kind == "cuda"
        pipellm_accelerate.enable(model, s)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, want_logits)
            before, decrypted = s.status().counters, ep.h2d[0].messages + ep.h2d[1].messages
            for _ in range(FORWARDS - 1):
                assert torch.equal(model(**batch).logits, want_logits)
            after = s.status().counters
            assert torch.equal(generate(model, batch), want_tokens)
        hits, total = after.hits - before.hits, judged(after) - judged(before)
        assert total >= 5 * (FORWARDS - 1) and hits / total >= 0.99, (hits, total)
        assert ep.h2d[0].messages + ep.h2d[1].messages - decrypted >= total, "every fetch went through the GPU"
        assert ep.accepted == ep.h2d[0].messages + ep.h2d[1].messages and ep.dead is None
        pipellm_accelerate.disable(model)


def test_execution_device_must_be_the_endpoints(daemon) -> None:
    model = build("opt")
    offload(model, "cpu_offload")
    for _, _, hook in pipellm_accelerate._offloading_hooks(model):
        hook.execution_device = torch.device("cuda", 0)  # as if dispatched to a GPU (nothing runs here)
    with Client(daemon.socket) as client, client.open_session(name="acc-where") as s:
        with pytest.raises(
            InvalidArgument, match=r'executes on cuda:0, but this session.s cpu endpoint writes cpu.*endpoint="cuda"'
        ):
            pipellm_accelerate.enable(model, s)
        assert not s.core.regions


@pytest.mark.gpu
@pytest.mark.skipif(not real_gpu()[0], reason=f"needs a CUDA GPU for torch and CuPy: {real_gpu()[1]}")
def test_on_a_real_gpu(daemon) -> None:
    """accelerate offloading to a CUDA execution device, decrypted on that GPU: logits and tokens equal to
    the same offloaded model without PipeLLM on the same GPU; hit rate >= 0.99 after the first forward."""
    gpu = torch.device("cuda", 0)
    model = build("llama")
    batch = {k: v.to(gpu) for k, v in inputs().items()}
    plain = copy.deepcopy(model)
    accelerate.cpu_offload(plain, execution_device=gpu)
    with torch.no_grad():
        want_logits = plain(**batch).logits
        want_tokens = generate(plain, batch)
    accelerate.cpu_offload(model, execution_device=gpu)
    with Client(daemon.socket) as client, client.open_session(name="acc-gpu", endpoint="cuda", device=0) as s:
        pipellm_accelerate.enable(model, s)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, want_logits)
            before = s.status().counters
            for _ in range(FORWARDS - 1):
                assert torch.equal(model(**batch).logits, want_logits)
            after = s.status().counters
            assert torch.equal(generate(model, batch), want_tokens)
        hits, total = after.hits - before.hits, judged(after) - judged(before)
        assert hits / total >= 0.99, (hits, total)
