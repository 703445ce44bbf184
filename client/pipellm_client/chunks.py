"""Splitting transfers into encryption units: one IV and one tag per chunk, the last chunk short."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, NamedTuple

from .errors import InvalidArgument

DEFAULT_CHUNK: Final = 1 << 20


class Chunk(NamedTuple):
    offset: int  # in the source region
    length: int
    dst_offset: int  # in the transfer's destination


def split(offset: int, length: int, chunk_size: int = DEFAULT_CHUNK) -> Iterator[Chunk]:
    if chunk_size <= 0:
        raise InvalidArgument(f"chunk size must be > 0, got {chunk_size}")
    if offset < 0 or length <= 0:
        raise InvalidArgument(f"need offset >= 0 and length > 0, got offset={offset} length={length}")
    done = 0
    while done < length:
        n = min(chunk_size, length - done)
        yield Chunk(offset + done, n, done)
        done += n


def count(length: int, chunk_size: int = DEFAULT_CHUNK) -> int:
    return -(-length // chunk_size)
