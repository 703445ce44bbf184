"""Geometry of a session's bounce arena: the untrusted shared memory that carries ciphertext only.

[ NOP cells | H2D slots (allocated by the daemon) | D2H slots (allocated by the endpoint) ]
Each side allocates only its own part, so neither needs to ask the other for a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Final

from .crypto import TAG_LEN
from .errors import SlotError
from .shm import PAGE, round_up

NOP_CELL: Final = 64


@dataclass(frozen=True)
class ArenaLayout:
    chunk_size: int
    h2d_slots: int
    d2h_slots: int
    nop_cells: int = 256

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.h2d_slots <= 0 or self.d2h_slots <= 0 or self.nop_cells <= 0:
            raise SlotError("arena needs a positive chunk size and at least one slot of each kind")

    @cached_property  # on every delivery's path: computed once
    def slot_stride(self) -> int:
        return round_up(self.chunk_size + TAG_LEN, PAGE)

    @cached_property  # on every delivery's path: computed once
    def nop_bytes(self) -> int:
        return round_up(self.nop_cells * NOP_CELL, PAGE)

    @cached_property  # on every delivery's path: computed once
    def size(self) -> int:
        return self.nop_bytes + (self.h2d_slots + self.d2h_slots) * self.slot_stride

    def nop_cell(self, i: int) -> int:
        if not 0 <= i < self.nop_cells:
            raise SlotError(f"NOP cell {i} out of range 0..{self.nop_cells - 1}")
        return i * NOP_CELL

    def h2d_slot(self, i: int) -> int:
        if not 0 <= i < self.h2d_slots:
            raise SlotError(f"H2D slot {i} out of range 0..{self.h2d_slots - 1}")
        return self.nop_bytes + i * self.slot_stride

    def d2h_slot(self, i: int) -> int:
        if not 0 <= i < self.d2h_slots:
            raise SlotError(f"D2H slot {i} out of range 0..{self.d2h_slots - 1}")
        return self.nop_bytes + (self.h2d_slots + i) * self.slot_stride

    def check_message(self, length: int) -> None:
        """A slot holds one chunk plus its tag."""
        if not 0 < length <= self.chunk_size:
            raise SlotError(f"message of {length} bytes does not fit a {self.chunk_size}-byte slot")
