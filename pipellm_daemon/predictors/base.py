"""What a predictor is: it watches committed chunks and names the chunks it expects next, in order."""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Key(NamedTuple):
    """One encryption unit: a chunk of a region, as a commit would name it."""

    region: int
    offset: int
    length: int


class Predictor(Protocol):
    name: str

    def observe(self, key: Key) -> None:
        """A chunk was committed on the speculative stream (in commit order)."""

    def upcoming(self, limit: int) -> list[Key]:
        """Up to `limit` chunks expected next, nearest first; [] when this predictor has no opinion."""

    def forget_region(self, region: int) -> None:
        """The region is gone: never predict it again."""
