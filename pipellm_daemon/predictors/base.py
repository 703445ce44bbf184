"""What a predictor is: it watches committed chunks and names the chunks it expects next, in order."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class ChunkId(NamedTuple):
    """Which chunk: one encryption unit of a region (region id, offset, length), as a commit names it."""

    region: int
    offset: int
    length: int


class Predictor(Protocol):
    name: str

    def observe(self, key: ChunkId) -> None:
        """A chunk was committed on the speculative stream (in commit order)."""

    def upcoming(self, limit: int) -> list[ChunkId]:
        """Up to `limit` chunks expected next, nearest first; [] when this predictor has no opinion."""

    def forget_region(self, region: int) -> None:
        """The region is gone: never predict it again."""
