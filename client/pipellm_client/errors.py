"""Typed errors shared by the SDK, the endpoint and the daemon.

Each one names what was wrong so a caller can act on it; none ever carries key material.
"""

from __future__ import annotations


class PipeLLMError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidArgument(PipeLLMError, ValueError):
    """Bad input: wrong sizes, out-of-range offsets, malformed frames."""


class SlotError(InvalidArgument):
    """A bounce slot that is too small, out of range, or not owned by the caller."""


class ChannelError(PipeLLMError):
    """A request the channel refuses; the channel itself stays usable unless the subclass says otherwise."""


class IvOverflow(ChannelError):
    """The 32-bit message counter would pass 0xFFFFFFFF; the channel needs an IV rotation first."""


class IvReuse(ChannelError):
    """A reserved IV was offered a second time; refusing it is what keeps (key, nonce) pairs unique."""


class UnreservedIv(ChannelError):
    """An IV this sender never reserved, or one abandoned by an IV or key rotation."""


class OutOfOrder(ChannelError):
    """A message submitted out of IV order; the endpoint would reject it, so the sender refuses first."""


class ChannelDead(ChannelError):
    """The channel is dead (tag failure or key exhausted); every later message is refused. Needs new keys."""


class TagMismatch(ChannelDead):
    """Authentication failed: tampered, replayed, reordered or dropped message. Fatal for the channel."""


class KeyExhausted(ChannelDead):
    """Key usage passed the upper threshold without a rotation; the channel is dead."""


class KeyVersionExpired(ChannelDead):
    """D2H data under a key version older than the ring keeps; it can never be decrypted."""


class StaleSource(PipeLLMError):
    """A region changed after its ciphertext was made; the ciphertext must not be delivered."""
