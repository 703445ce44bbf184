"""A session's counters: what its commits, speculation and landings did, for status and metrics."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb


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
