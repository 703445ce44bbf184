"""The daemon's side of a session's delivery ring: what it published there, and how far the SDK took it.

The ring lives in memory the serving process can write, so the daemon keeps its own copy of every record
it published from `base` on (this copy, not the shared memory, is what it trusts) and reads back only the
SDK's consumer index, which it checks. The first `assigned` of the records were handed out by slow-path
deliveries and await consumption; the rest are still the SDK's to take from the ring.

Mechanism only: which records to publish, hand out or burn is the pipeline's decision.
"""

from __future__ import annotations

import itertools
from collections import deque

from pipellm_client.ring import Record, RingView

from .streams import Entry

Published = tuple[Entry | None, Record]  # the entry a DATA record carries; None for a rotation record


class PublishedRecords:
    def __init__(self, ring: RingView) -> None:
        self.ring = ring
        self._records: deque[Published] = deque()
        self.base = 0
        self.assigned = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def top(self) -> int:
        """The index the next record gets (the producer index once announced)."""
        return self.base + len(self._records)

    @property
    def room(self) -> int:
        return self.ring.capacity - len(self._records)

    def write(self, entry: Entry | None, rec: Record) -> None:
        self.ring.write(self.top, rec)
        self._records.append((entry, rec))

    def announce(self, *, bell_wanted: bool) -> None:
        """Make what was written visible to the SDK, and say whether we wait for it to take records."""
        self.ring.produced = self.top
        self.ring.bell_wanted = bell_wanted

    def unassigned(self) -> list[Published]:
        """Published records no slow-path delivery has handed out, in ring order."""
        return list(itertools.islice(self._records, self.assigned, None))

    def assign(self) -> None:
        """The first unassigned record goes out in a slow-path delivery."""
        if self.assigned >= len(self._records):
            raise AssertionError("no published record left to hand out")
        self.assigned += 1

    def unassign(self) -> None:
        """The last record handed out was never sent: it is the SDK's to take again, first in line."""
        if self.assigned <= 0:
            raise AssertionError("no handed-out record to take back")
        self.assigned -= 1

    def take_consumed(self) -> list[tuple[Entry | None, bool]]:
        """The records the SDK consumed since the last call, oldest first, each with whether a slow-path
        delivery had handed it out (else the SDK took it from the ring itself: a hit we hear of only now).

        Raises ValueError for a consumer index outside what was published (a corrupt or hostile client).
        """
        consumed = self.ring.consumed
        if not self.base <= consumed <= self.top:
            raise ValueError(f"delivery ring consumer index {consumed} outside [{self.base}, {self.top}]")
        taken: list[tuple[Entry | None, bool]] = []
        while self.base < consumed:
            e, _rec = self._records.popleft()
            self.base += 1
            handed_out = self.assigned > 0
            if handed_out:
                self.assigned -= 1
            taken.append((e, handed_out))
        return taken

    def clear(self) -> None:
        self._records.clear()
