"""LoRA adapters (the `peft` library) loaded and hot-swapped through PipeLLM.

Multi-LoRA serving keeps many adapters in host memory and a few "slots" on the GPU, and swaps adapters into
slots as batches need them; every swap is a host-to-device copy that a CC-mode GPU has the CPU encrypt.

`LoraAdapters(session, peft_model)` keeps each registered adapter in its own sealed read-only region
registered with `adapter=True` (the daemon's LoRA predictor knows it), laid out like the slot it will be
loaded into. A slot is a peft adapter name in the model; its LoRA parameters are re-pointed at one flat
buffer with the same layout, so loading an adapter is a single commit from its region straight into the
slot's parameters: no staging copy. Loading follows peft's hot-swap rules (`hotswap_adapter`): configs must
be compatible (`check_hotswap_configs_compatible`), shapes equal, and the LoRA scaling is updated from the
incoming adapter's alpha and rank. `hint(names)` declares the next batch's adapters as intents, so the
daemon encrypts them ahead (S-LoRA's "prefetch the next batch's adapters").

The model's LoRA parameters must live where the session's endpoint writes: on the CPU with the CPU
endpoint, on the endpoint's GPU with a session opened with `endpoint="cuda"` (then a slot's buffer is
device memory the endpoint allocates, and each load is decrypted and verified on the GPU straight into the
slot's parameters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._core import Intent
from ..errors import InvalidArgument
from ._packing import Layout, pack_into, typed_view

if TYPE_CHECKING:
    import torch

    from ..client import Session
    from ..regions import Region


@dataclass
class _Slot:
    """A peft adapter name whose LoRA parameters are views into one flat buffer (the "device" slot)."""

    name: str
    layout: Layout  # slots named by canonical (saved-format) keys
    buffer: torch.Tensor
    params: dict[str, torch.nn.Parameter]  # canonical key -> parameter (a view into buffer)
    loaded: str | None = None


@dataclass
class _Adapter:
    name: str
    config: Any  # peft.LoraConfig
    layout: Layout
    region: Region


def _canonical(param_name: str, slot: str) -> str:
    """peft's saved-format key of a slot parameter: the adapter name removed, as get_peft_model_state_dict does."""
    return param_name.replace(f".{slot}", "")


def _is_slot_param(param_name: str, slot: str) -> bool:
    parts = param_name.split(".")
    return any(parts[i] == slot and parts[i - 1].startswith("lora_") for i in range(1, len(parts)))


class LoraAdapters:
    """Adapters in host regions, loaded into the model's LoRA slots through the channel."""

    def __init__(self, session: Session, model: Any) -> None:
        """`model` is a `peft.PeftModel` with LoRA adapters (any existing adapter name can serve as a slot)."""
        self.session = session
        self.model = model
        self.adapters: dict[str, _Adapter] = {}
        self.slots: dict[str, _Slot] = {}
        self.loads = 0

    # -- registering adapters ------------------------------------------------------------------------
    def register(
        self, name: str, source: str | os.PathLike[str] | Mapping[str, torch.Tensor], config: Any = None
    ) -> None:
        """Copy an adapter into a sealed adapter region: `source` is a saved adapter directory (read with
        peft's `load_peft_weights` / `PeftConfig.from_pretrained`) or a state dict in that format + config."""
        from peft import PeftConfig
        from peft.utils.save_and_load import load_peft_weights

        if name in self.adapters:
            raise InvalidArgument(f"adapter {name!r} is already registered")
        if isinstance(source, str | os.PathLike):
            state = load_peft_weights(os.fspath(source), device="cpu")
            config = config or PeftConfig.from_pretrained(os.fspath(source))
        else:
            state = dict(source)
        if config is None:
            raise InvalidArgument("a state dict needs its LoraConfig")
        layout = Layout.of(sorted(state.items()))
        region = self.session.alloc_region(layout.nbytes, readonly=True, name=f"lora-{name}", adapter=True)
        try:
            pack_into(region.tensor(), layout, state)
            region.seal()
        except BaseException:
            self.session.unregister(region)
            raise
        self.adapters[name] = _Adapter(name, config, layout, region)

    def unregister(self, name: str) -> None:
        adapter = self.adapters.pop(name)
        self.session.unregister(adapter.region)

    # -- slots ---------------------------------------------------------------------------------------
    def _slot(self, slot: str, config: Any) -> _Slot:
        """Adopt (or create, with `config`) the peft adapter `slot` and point its LoRA parameters at one buffer."""
        import torch

        have = self.slots.get(slot)
        if have is not None:
            return have
        if slot not in self.model.peft_config:
            self.model.add_adapter(slot, config)
        named = [(n, p) for n, p in self.model.named_parameters() if _is_slot_param(n, slot)]
        if not named:
            raise InvalidArgument(f"adapter slot {slot!r} has no LoRA parameters")
        # The same canonical order as adapters use (sorted keys), so one layout describes both.
        keyed = sorted((_canonical(n, slot), n, p) for n, p in named)
        layout = Layout.of((k, p) for k, _n, p in keyed)
        endpoint = self.session.endpoint
        cuda = endpoint.kind == "cuda"
        writes = endpoint.torch_device if cuda else torch.device("cpu")  # type: ignore[attr-defined]
        for n, p in named:
            if p.device != writes:
                hint = ' (open the session with endpoint="cuda" on that GPU)' if p.device.type == "cuda" else ""
                raise InvalidArgument(
                    f"LoRA parameter {n} is on {p.device}, but this session's {endpoint.kind} endpoint writes "
                    f"{writes}{hint}"
                )
        # A CUDA endpoint allocates the slot's device memory itself (it is what it decrypts into).
        zeros = endpoint.torch_empty(layout.nbytes).zero_ if cuda else None  # type: ignore[attr-defined]
        buffer = zeros() if zeros is not None else torch.zeros(layout.nbytes, dtype=torch.uint8)
        params: dict[str, torch.nn.Parameter] = {}
        with torch.no_grad():
            for (key, pname, old), s in zip(keyed, layout.slots, strict=True):
                view = typed_view(buffer, s)
                view.copy_(old)
                new = torch.nn.Parameter(view, requires_grad=old.requires_grad)
                owner, _, attr = pname.rpartition(".")
                self.model.get_submodule(owner).register_parameter(attr, new)
                params[key] = new
        st = _Slot(slot, layout, buffer, params)
        self.slots[slot] = st
        return st

    def _set_scaling(self, slot: str, config: Any) -> None:
        """peft's hot-swap scaling rule: alpha / r (or / sqrt(r) with rsLoRA), per-module patterns applied."""
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import get_pattern_key

        for mname, module in self.model.named_modules():
            if not isinstance(module, LoraLayer) or slot not in module.scaling:
                continue
            rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), mname), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), mname), config.lora_alpha)
            scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
            current = module.scaling[slot]
            if hasattr(current, "fill_"):
                current.fill_(scaling)
            else:
                module.scaling[slot] = scaling

    # -- loading -------------------------------------------------------------------------------------
    def load(self, name: str, slot: str = "default", *, activate: bool = True) -> None:
        """Hot-swap adapter `name` into `slot` through the channel (one commit), then make it active."""
        from peft.utils.hotswap import check_hotswap_configs_compatible

        adapter = self.adapters.get(name)
        if adapter is None:
            raise InvalidArgument(f"adapter {name!r} is not registered")
        st = self._slot(slot, adapter.config)
        if st.loaded != name:
            try:
                check_hotswap_configs_compatible(self.model.peft_config[slot], adapter.config)
            except ValueError as exc:
                raise InvalidArgument(f"adapter {name!r} cannot be hot-swapped into slot {slot!r}: {exc}") from None
            if adapter.layout != st.layout:
                raise InvalidArgument(
                    f"adapter {name!r} has other LoRA tensors (targets, rank or dtype) than slot {slot!r}; "
                    "load it into a slot created for it"
                )
            self.session.h2d(adapter.region, 0, adapter.layout.nbytes, st.buffer)
            self._set_scaling(slot, adapter.config)
            st.loaded = name
            self.loads += 1
        if activate:
            self.model.set_adapter(slot)

    def hint(self, names: Sequence[str]) -> int:
        """The next batch will load these adapters, in this order: declare them so the daemon encrypts ahead.

        Adapters already loaded in a slot are left out (loading them again moves nothing). Replaces earlier
        hints (and any other intents of this session). Returns the number of intents declared.
        """
        threshold = self.session.small_transfer_threshold
        resident = {s.loaded for s in self.slots.values()}
        intents = []
        for n in names:
            a = self.adapters.get(n)
            if a is None:
                raise InvalidArgument(f"adapter {n!r} is not registered")
            # Below the small-transfer threshold a load takes the second channel and is never speculated.
            if n not in resident and a.layout.nbytes >= threshold:
                intents.append(Intent(a.region, 0, a.layout.nbytes))
        if intents:
            self.session.declare(intents, replace=True)
        return len(intents)

    def close(self) -> None:
        for name in list(self.adapters):
            if not self.session.closed:
                self.unregister(name)
