"""A session's counters: what its commits, speculation and landings did, for status and metrics."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Final

from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

SOURCES: Final = ("intents", "swap", "cycle", "lora")  # the predictors, as `Entry.source` names them
SOURCE_KINDS: Final = ("ahead", "used", "wasted")
# (source, kind) -> its counter field, built once: `used` runs on every hit.
_SOURCE_FIELD: Final = {(src, kind): f"{src}_bytes_{kind}" for src in SOURCES for kind in SOURCE_KINDS}


@dataclass
class Counters:
    commits: int = 0
    chunks: int = 0
    hits: int = 0
    skips: int = 0
    misses: int = 0
    nops: int = 0
    discards: int = 0
    iv_rotations: int = 0
    key_rotations: int = 0
    relinquishes: int = 0
    stale: int = 0
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    bytes_ahead: int = 0
    bytes_wasted: int = 0
    bytes_on_demand: int = 0
    channel_deaths: int = 0
    small_transfers: int = 0
    d2h_messages: int = 0
    late: int = 0
    detours: int = 0
    staged: int = 0
    waited: int = 0
    ring_hits: int = 0
    ring_discards: int = 0
    bytes_used: int = 0
    # Per source (the predictor an entry was made for): see `ahead`, `used`, `wasted`.
    intents_bytes_ahead: int = 0
    intents_bytes_used: int = 0
    intents_bytes_wasted: int = 0
    swap_bytes_ahead: int = 0
    swap_bytes_used: int = 0
    swap_bytes_wasted: int = 0
    cycle_bytes_ahead: int = 0
    cycle_bytes_used: int = 0
    cycle_bytes_wasted: int = 0
    lora_bytes_ahead: int = 0
    lora_bytes_used: int = 0
    lora_bytes_wasted: int = 0

    # -- ciphertext made ahead, by source: what each predictor's guesses cost and what they saved ------------
    def ahead(self, source: str, nbytes: int) -> None:
        """An entry predicted by `source` was sent to a worker."""
        self.bytes_ahead += nbytes
        self._by_source(source, "ahead", nbytes)

    def used(self, source: str, nbytes: int) -> None:
        """Ciphertext made ahead was delivered as DATA (a hit, or a skip's target)."""
        self.bytes_used += nbytes
        self._by_source(source, "used", nbytes)

    def wasted(self, source: str, nbytes: int) -> None:
        """Ciphertext made ahead was thrown away (DISCARD, an IV rotation over it, a dead worker)."""
        self.bytes_wasted += nbytes
        self._by_source(source, "wasted", nbytes)

    def _by_source(self, source: str, kind: str, nbytes: int) -> None:
        name = _SOURCE_FIELD.get((source, kind))
        if name is not None:
            setattr(self, name, getattr(self, name) + nbytes)

    def bytes_of(self, source: str, kind: str) -> int:
        """Bytes a source made ahead, used or wasted (`kind` one of SOURCE_KINDS)."""
        return int(getattr(self, _SOURCE_FIELD[source, kind]))

    def source_summary(self) -> dict[str, dict[str, int]]:
        """Per source: bytes made ahead, used and wasted (sources that made nothing left out)."""
        out = {}
        for src in SOURCES:
            row = {kind: self.bytes_of(src, kind) for kind in SOURCE_KINDS}
            if row["ahead"]:
                out[src] = row
        return out

    @property
    def hit_rate(self) -> float:
        judged = self.hits + self.skips + self.misses + self.late
        return self.hits / judged if judged else 0.0

    def add(self, other: Counters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hit_rate"] = round(self.hit_rate, 6)
        return d

    def to_proto(self) -> pb.Counters:
        return pb.Counters(**self.as_dict())
