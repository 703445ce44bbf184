"""KV swapping: a block swapped out is predicted to come back, in the serving engine's swap-in order.

vLLM V0 preempts the newest request first and swaps in first-come-first-served, so requests come back in
the reverse of their swap-out order while the blocks of one request keep their order (layer-major, K before
V): "lifo" over groups. vLLM V1's offloading runs FIFO jobs per direction: "fifo".
"""

from __future__ import annotations

from collections import OrderedDict

from .base import Key


class SwapPredictor:
    name = "swap"

    def __init__(self, order: str = "fifo") -> None:
        if order not in ("fifo", "lifo"):
            raise ValueError("swap order must be fifo or lifo")
        self.order = order
        self._groups: OrderedDict[int, list[Key]] = OrderedDict()  # group -> chunks, swap-out order
        self._where: dict[Key, int] = {}
        self._anon = 0

    def swapped_out(self, keys: list[Key], group: int) -> None:
        if group == 0:
            self._anon -= 1
            group = self._anon  # an ungrouped block is a group of its own
        for k in keys:
            old = self._where.get(k)
            if old is not None:
                self._drop(k, old)
            self._where[k] = group
        self._groups.setdefault(group, []).extend(keys)
        self._groups.move_to_end(group)

    def _drop(self, key: Key, group: int) -> None:
        keys = self._groups[group]
        keys.remove(key)
        if not keys:
            del self._groups[group]

    def observe(self, key: Key) -> None:
        group = self._where.pop(key, None)
        if group is not None:
            self._drop(key, group)

    def upcoming(self, limit: int) -> list[Key]:
        groups = reversed(self._groups.values()) if self.order == "lifo" else iter(self._groups.values())
        out: list[Key] = []
        for keys in groups:
            for k in keys:
                out.append(k)
                if len(out) >= limit:
                    return out
        return out

    @property
    def pending(self) -> int:
        return len(self._where)

    def forget_region(self, region: int) -> None:
        self._where = {k: g for k, g in self._where.items() if k.region != region}
        for g in list(self._groups):
            self._groups[g] = [k for k in self._groups[g] if k.region != region]
            if not self._groups[g]:
                del self._groups[g]
