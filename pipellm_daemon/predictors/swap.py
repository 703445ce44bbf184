"""KV swapping: a block swapped out is predicted to come back, in the serving engine's swap-in order.

vLLM V1's offloading runs FIFO jobs per direction: "fifo", blocks come back in swap-out order.

vLLM V0 ("lifo") preempts the newest request first and swaps in first-come-first-served, so requests come
back newest-swapped-out first. Its CacheEngine copies layer by layer, K then V, and within each the blocks
of every request in the mapping: a swap-in of requests S is round after round of one unit (one d2h/h2d
range) per request of S. The set S is guessed as the most recent groups (as many as came back last time;
all of them the first time) and learned exactly from the first round of the swap-in itself: a group seen
twice starts round two.

A request's turn in a round is a run: its units that follow each other in the region (the blocks of one
layer's K, say). An integration that packs adjacent copies sends a run as one unit; vLLM's own
`swap_blocks` sends one copy per block, so a run is many units, each adjacent to the one before. Units of
one group that are adjacent in the region are therefore taken together, both when the rounds are
predicted and when the swap-in is observed (a group's next block is not a new round).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .base import ChunkId


class SwapPredictor:
    name = "swap"

    def __init__(self, order: str = "fifo") -> None:
        if order not in ("fifo", "lifo"):
            raise ValueError("swap order must be fifo or lifo")
        self.order = order
        self._groups: OrderedDict[int, deque[list[ChunkId]]] = OrderedDict()  # group -> units, swap-out order
        self._where: dict[ChunkId, int] = {}
        self._anon = 0
        # vLLM V0 swap-in state
        self._round: list[int] = []  # groups whose unit this round has started, in order
        self._active: list[int] | None = None  # the set coming back, in round order, once learned
        self._current: int | None = None  # group whose head unit is part-way through
        self._last_k = 0  # how many requests the last swap-in brought back (0: none seen yet: guess all)
        self._swapins = 0  # swap-ins started so far
        self._group_epoch: dict[int, int] = {}  # group -> swap-ins that had started when it was swapped out

    def swapped_out(self, keys: list[ChunkId], group: int, *, continues: bool = False) -> None:
        """`keys` were swapped out as one unit of `group`; `continues`: more of the previous call's unit
        (a d2h call larger than the free bounce slots reaches the daemon in several pieces)."""
        if not keys:
            return
        if group == 0 and not continues:
            self._anon -= 1
        if group == 0:
            group = self._anon  # an ungrouped block is a group of its own
        for k in keys:  # a block swapped out again is where it was swapped out last
            old = self._where.pop(k, None)
            if old is not None:
                self._drop(k, old)
        for k in keys:
            self._where[k] = group
        units = self._groups.get(group)
        if continues and units:
            units[-1].extend(keys)
            return
        # A group's place is where it first appeared: requests swapped out in one step arrive interleaved,
        # unit by unit, and must not reorder each other. A group swapped out again after a swap-in since its
        # last swap-out is a new preemption of that request: its leftovers are stale, its place is newest.
        if group in self._groups and self._group_epoch.get(group, self._swapins) < self._swapins:
            for unit in self._groups.pop(group):
                for k in unit:
                    self._where.pop(k, None)
        self._group_epoch[group] = self._swapins
        self._groups.setdefault(group, deque()).append(list(keys))

    def _drop(self, key: ChunkId, group: int) -> None:
        """Remove a key (and its unit, and its group, once empty)."""
        units = self._groups[group]
        for unit in units:
            if key in unit:
                unit.remove(key)
                if not unit:
                    units.remove(unit)
                break
        if not units:
            del self._groups[group]

    def observe(self, key: ChunkId) -> None:
        group = self._where.pop(key, None)
        if group is None:
            return
        started = self._current != group  # a run's chunks arrive back to back
        self._drop(key, group)
        if self.order != "lifo":
            return
        units = self._groups.get(group)
        self._current = group if units and _adjacent(key, units[0][0]) else None  # the run goes on
        if not started:
            return
        if self._active is not None and group not in self._active:
            self._active, self._round = None, []  # a new swap-in: learn its set again
        if not self._round:
            self._swapins += 1
        if group in self._round:
            self._active = list(self._round)  # round two begins: the set is known exactly
            self._last_k = len(self._active)
            self._round = [group]
        else:
            self._round.append(group)

    def _rounds(self, limit: int) -> list[ChunkId]:
        if not self._groups:
            self._active, self._round, self._current = None, [], None
            return []
        order = [g for g in self._active if g in self._groups] if self._active is not None else []
        if not order:  # nothing of the learned set is left: the next swap-in is a new one
            self._active = None
            self._round = [g for g in self._round if g in self._groups]
        if self._active is None:
            newest_first = list(reversed(self._groups))  # the oldest request comes back first
            seen = [g for g in self._round if g in self._groups]
            want = max(self._last_k or len(newest_first), len(seen))
            order = seen + [g for g in newest_first if g not in seen][: want - len(seen)]
        out: list[ChunkId] = []
        cursor = dict.fromkeys(order, 0)  # group -> index of its next unit
        if self._current is not None and self._current in self._groups:
            cursor[self._current] = _take_run(self._groups[self._current], 0, out, limit)  # the run in flight
        started = set(self._round)
        for g in order:  # the rest of this round
            if g not in started and len(out) < limit:
                cursor[g] = _take_run(self._groups[g], 0, out, limit)
        while len(out) < limit:  # then whole rounds
            progressed = False
            for g in order:
                units = self._groups[g]
                if cursor[g] < len(units) and len(out) < limit:
                    cursor[g] = _take_run(units, cursor[g], out, limit)
                    progressed = True
            if not progressed:
                break
        return out[:limit]

    def upcoming(self, limit: int) -> list[ChunkId]:
        if self.order == "lifo":
            return self._rounds(limit)
        out: list[ChunkId] = []
        for units in self._groups.values():
            for unit in units:
                out.extend(unit)
                if len(out) >= limit:
                    return out[:limit]
        return out

    @property
    def pending(self) -> int:
        return len(self._where)

    def forget_region(self, region: int) -> None:
        for k in [k for k in self._where if k.region == region]:
            self._drop(k, self._where.pop(k))
        self._current = None
        self._round = [g for g in self._round if g in self._groups]
        if self._active is not None:
            self._active = [g for g in self._active if g in self._groups]


def _adjacent(a: ChunkId, b: ChunkId) -> bool:
    """`b` starts where `a` ends, in the same region."""
    return a.region == b.region and a.offset + a.length == b.offset


def _take_run(units: deque[list[ChunkId]], i: int, out: list[ChunkId], limit: int) -> int:
    """Append the run that starts at unit `i` (it and every following unit adjacent to the one before) to
    `out`, stopping once `out` holds `limit` chunks (a prediction is asked for its first few only); return
    the index of the unit after the last one taken."""
    out.extend(units[i])
    i += 1
    while i < len(units) and len(out) < limit and _adjacent(units[i - 1][-1], units[i][0]):
        out.extend(units[i])
        i += 1
    return i
