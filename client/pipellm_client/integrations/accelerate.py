"""accelerate CPU offloading through PipeLLM: every offloaded weight reaches the execution device encrypted.

accelerate offloads a model (`cpu_offload`, or `dispatch_model` with modules mapped to "cpu") by hanging an
`AlignDevicesHook` on each module; its `pre_forward` takes each weight from `hook.weights_map` and puts it on
the execution device with `set_module_tensor_to_device`, synchronously, in forward order; `post_forward`
puts it back on "meta". On a confidential-computing GPU each of those copies is encrypted by the CPU.

`enable(model, session)` copies every offloaded tensor once into one sealed read-only region (each hooked
module's tensors contiguous, 64-byte aligned) and wraps each hook's `pre_forward`: it commits the module's
block through the channel into a fresh execution buffer (one transfer, one round trip per module) and lets
the original `pre_forward` run with a weights map whose entries are views of that buffer, so accelerate's
own placement code (tied weights, dtype casts, buffers) runs unchanged on the decrypted tensors.

The order of fetches is the same every forward. The daemon's cycle predictor learns it from the second
forward on; by default the first forward's order is also declared as a cyclic intent, which makes the
prediction exact from the second forward on. `disable()` restores the hooks as they were.

The execution device must be one the session's endpoint writes: the CPU with the CPU endpoint, or the
endpoint's GPU with a session opened with `endpoint="cuda"` (then each module's block is decrypted and
verified on the GPU, straight into a device buffer that the endpoint allocates; the weights never exist in
plaintext on the host side of the channel, nor in device memory before they authenticated).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._core import Intent
from ..errors import InvalidArgument
from ._packing import Layout, pack_into, typed_view

if TYPE_CHECKING:
    import torch

    from ..client import Session
    from ..regions import Region

_ATTR = "_pipellm_offload"


class _Overlay(Mapping[str, Any]):
    """The hook's weights map with this forward's decrypted tensors in front (other keys fall through)."""

    def __init__(self, front: dict[str, torch.Tensor], back: Mapping[str, Any]) -> None:
        self.front = front
        self.back = back

    def __getitem__(self, key: str) -> Any:
        if key in self.front:
            return self.front[key]
        return self.back[key]

    def __contains__(self, key: object) -> bool:
        return key in self.front or key in self.back

    def __iter__(self) -> Iterator[str]:
        return iter(self.back)

    def __len__(self) -> int:
        return len(self.back)


@dataclass
class _Block:
    """One offloading hook: its module, where its tensors sit in the region, what it wrapped."""

    module: torch.nn.Module
    hook: Any  # accelerate.hooks.AlignDevicesHook
    name: str
    layout: Layout
    offset: int = 0
    device: torch.device | None = None
    saved_pre_forward: Callable[..., Any] | None = None  # an instance attribute that was there before us


@dataclass
class OffloadStats:
    fetches: int = 0
    bytes: int = 0
    forwards: int = 0
    declared: int = 0  # transfers declared as a cyclic intent
    order: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of the recorded forward


def _resolved(device: torch.device) -> torch.device:
    """`cuda` without an index means the current device."""
    import torch

    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _offloading_hooks(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, Any]]:
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None:
            continue
        hooks = list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]
        for h in hooks:
            if isinstance(h, AlignDevicesHook) and h.offload:
                yield name, module, h


class PipeLLMOffload:
    """The state of one enabled model; `disable()` undoes everything `enable` did."""

    def __init__(self, model: torch.nn.Module, session: Session, *, declare: bool = True) -> None:
        import torch
        from accelerate.utils import named_module_tensors

        if getattr(model, _ATTR, None) is not None:
            raise InvalidArgument("PipeLLM offloading is already enabled on this model")
        self.model = model
        self.session = session
        self.declare = declare
        self.stats = OffloadStats()
        self.blocks: list[_Block] = []
        self._recording: list[tuple[int, int]] | None = None
        self._root_handles: list[Any] = []
        endpoint = session.endpoint  # a re-key replaces it: read it from the session when it is needed
        self._cuda = endpoint.kind == "cuda"
        writes = endpoint.torch_device if self._cuda else torch.device("cpu")  # type: ignore[attr-defined]
        tensors: list[dict[str, torch.Tensor]] = []
        offset = 0
        for name, module, hook in _offloading_hooks(model):
            device = _resolved(torch.device(hook.execution_device if hook.execution_device is not None else "cpu"))
            if device != writes:
                hint = ' (open the session with endpoint="cuda" on that GPU)' if device.type == "cuda" else ""
                raise InvalidArgument(
                    f"{name or 'model'} executes on {device}, but this session's {endpoint.kind} endpoint "
                    f"writes {writes}{hint}"
                )
            values = {
                n: hook.weights_map[n]
                for n, _ in named_module_tensors(
                    module,
                    include_buffers=hook.offload_buffers,
                    recurse=hook.place_submodules,
                    remove_non_persistent=True,
                )
            }
            if not values:
                continue
            layout = Layout.of(values.items())
            self.blocks.append(_Block(module, hook, name, layout, offset, device))
            tensors.append(values)
            offset += layout.nbytes
        if not self.blocks:
            raise InvalidArgument(
                "no offloaded weights found: dispatch the model with cpu_offload/dispatch_model first"
            )
        # One read-only region for the whole model, filled once and sealed: later writes fault.
        self.region: Region = session.alloc_region(offset, readonly=True, name="accelerate-weights")
        try:
            buf = self.region.tensor()
            for block, values in zip(self.blocks, tensors, strict=True):
                pack_into(buf[block.offset : block.offset + block.layout.nbytes], block.layout, values)
            del buf
            self.region.seal()
        except BaseException:
            session.unregister(self.region)
            raise
        for block in self.blocks:
            block.saved_pre_forward = block.hook.__dict__.get("pre_forward")
            block.hook.pre_forward = functools.partial(self._pre_forward, block)
        if declare:
            self._recording = []
            self._root_handles = [
                model.register_forward_pre_hook(self._root_pre),
                model.register_forward_hook(self._root_post),
            ]
        setattr(model, _ATTR, self)

    @property
    def nbytes(self) -> int:
        return self.region.size

    # -- the fetch -----------------------------------------------------------------------------------
    def _pre_forward(self, block: _Block, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        import torch

        hook = block.hook
        n = block.layout.nbytes
        # A fresh buffer per forward, as accelerate's own `.to(device)` allocates one: offloaded weights
        # must not stay resident on the device between forwards.
        if self._cuda:
            staging = self.session.endpoint.torch_empty(n)  # type: ignore[attr-defined]
        else:
            staging = torch.empty(n, dtype=torch.uint8, device=block.device)
        self.session.h2d(self.region, block.offset, n, staging)
        self.stats.fetches += 1
        self.stats.bytes += n
        if self._recording is not None:
            self._recording.append((block.offset, n))
        front = {s.name: typed_view(staging, s) for s in block.layout.slots}
        original = hook.weights_map
        hook.weights_map = _Overlay(front, original)
        try:
            inner = block.saved_pre_forward or type(hook).pre_forward.__get__(hook)
            return inner(module, *args, **kwargs)
        finally:
            hook.weights_map = original

    # -- declaring the order ------------------------------------------------------------------------
    def _root_pre(self, _module: torch.nn.Module, _args: Any) -> None:
        if self._recording is not None:
            self._recording.clear()

    def _root_post(self, _module: torch.nn.Module, _args: Any, _output: Any) -> None:
        self.stats.forwards += 1
        if self._recording is None or not self._recording:
            return
        order, self._recording = list(self._recording), None
        self.stats.order = order
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        # Transfers below the daemon's small-transfer threshold take the second channel and are never
        # speculated; declaring them would only queue ciphertext that gets burned.
        threshold = self.session.small_transfer_threshold
        intents = [Intent(self.region, off, n) for off, n in order if n >= threshold]
        if intents:
            self.session.declare(intents, cyclic=True)
            self.stats.declared = len(intents)

    # -- undo ----------------------------------------------------------------------------------------
    def disable(self) -> None:
        """Restore accelerate's own fetch, drop the declared order and free the region."""
        if getattr(self.model, _ATTR, None) is not self:
            return
        for block in self.blocks:
            if block.saved_pre_forward is not None:
                block.hook.pre_forward = block.saved_pre_forward
            else:
                block.hook.__dict__.pop("pre_forward", None)
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        self._recording = None
        if self.stats.declared and not self.session.closed:
            self.session.cancel_intents()
        if not self.session.closed:
            self.session.unregister(self.region)
        delattr(self.model, _ATTR)


def enable(model: torch.nn.Module, session: Session, *, declare: bool = True) -> PipeLLMOffload:
    """Fetch every offloaded weight of an accelerate-dispatched `model` through `session`.

    `declare=True` records the first forward's fetch order and declares it as a cyclic intent (the
    session's other intents are left alone; `disable` cancels the session's intents). Use one session per
    model: the session is not thread-safe and its predictions are per session.
    """
    return PipeLLMOffload(model, session, declare=declare)


def disable(model: torch.nn.Module) -> None:
    """Undo `enable` on `model` (a no-op when it is not enabled)."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        state.disable()
