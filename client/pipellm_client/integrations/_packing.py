"""Packing named tensors into one flat byte range and viewing them back, shared by the integrations.

A transfer is one (region, offset, length) range with one destination buffer, so an integration that wants
one commit per module or per adapter lays its tensors out contiguously: in the read-only region on the host
side and in a flat uint8 buffer on the device side, with the same offsets. Offsets are 64-byte aligned, the
alignment torch's CPU allocator gives, so kernels see the same alignment as with their own allocations.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidArgument

if TYPE_CHECKING:
    import torch

ALIGN = 64


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Slot:
    """Where one tensor sits in a packed block: byte offset, byte length, dtype and shape."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """The packed layout of a named set of tensors; two layouts are compatible iff they are equal."""

    slots: tuple[Slot, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: Iterable[tuple[str, torch.Tensor]]) -> Layout:
        slots: list[Slot] = []
        off = 0
        for name, t in tensors:
            n = t.numel() * t.element_size()
            slots.append(Slot(name, off, n, t.dtype, tuple(t.shape)))
            off = round_up(off + n)
        return cls(tuple(slots), max(off, ALIGN))

    def names(self) -> list[str]:
        return [s.name for s in self.slots]


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a tensor's bytes (copied only if it is not contiguous).

    Goes through torch, not numpy, so bfloat16 and other dtypes numpy lacks work too.
    """
    import torch

    t = t.detach()
    if t.device.type != "cpu":
        raise InvalidArgument(f"expected a CPU tensor, got one on {t.device}")
    return t.contiguous().reshape(-1).view(torch.uint8)


def typed_view(buf: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The tensor stored at `slot` inside the flat uint8 buffer `buf` (no copy)."""
    return buf[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def pack_into(buf: torch.Tensor, layout: Layout, tensors: dict[str, torch.Tensor]) -> None:
    """Copy each named tensor into its slot of `buf` (a uint8 tensor of at least layout.nbytes)."""
    for slot in layout.slots:
        t = tensors[slot.name]
        if t.dtype != slot.dtype or tuple(t.shape) != slot.shape:
            raise InvalidArgument(
                f"{slot.name}: got {t.dtype} {tuple(t.shape)}, the layout has {slot.dtype} {slot.shape}"
            )
        buf[slot.offset : slot.offset + slot.nbytes].copy_(raw_bytes(t))
