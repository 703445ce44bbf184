"""The GPU side of the channel, emulated on the CPU.

It consumes H2D messages strictly in its own IV order (DATA into the destination, NOP and DISCARD
verified and dropped), applies rotations when the ordered stream says so, and encrypts D2H data with
its own counter. A tag failure kills that channel and leaves nothing unauthenticated in the destination.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final

from .channel import KeyEpoch, RotationPolicy, Sender, StrictReceiver
from .crypto import TAG_LEN, Buffer
from .errors import ChannelDead, InvalidArgument, TagMismatch
from .keys import channel_label

NOP_PLAINTEXT: Final = b"NOP\x00"
NOP_MESSAGE_LEN: Final = len(NOP_PLAINTEXT) + TAG_LEN


class MsgKind(enum.IntEnum):
    """What the ordered delivery stream tells the endpoint to do with the next entry."""

    DATA = 1  # decrypt into the destination
    NOP = 2  # a 4-byte message that only burns an IV never used for anything else
    DISCARD = 3  # speculative ciphertext nobody wants: verify, consume its IV, drop the plaintext
    ROTATE_IV = 4  # chan_ctr+1, msg_ctr=0 (no IV consumed)
    ROTATE_KEY = 5  # next key version (no IV consumed)
    PLAIN = 6  # plain mode only: no encryption at all


@dataclass(frozen=True)
class ChannelSecrets:
    """Key material of one copy engine, as agreed in the handshake."""

    ce_index: int
    h2d_key: bytes
    h2d_mask: bytes
    d2h_key: bytes
    d2h_mask: bytes

    def __repr__(self) -> str:
        return f"<ChannelSecrets ce{self.ce_index:02d}>"


class CpuEndpoint:
    """One session's endpoint: a strict H2D receiver and a D2H sender per copy engine."""

    def __init__(self, secrets: list[ChannelSecrets], policy: RotationPolicy) -> None:
        self.h2d: list[StrictReceiver] = []
        self.d2h: list[Sender] = []
        for s in secrets:
            h_label, d_label = channel_label(s.ce_index, "h2d"), channel_label(s.ce_index, "d2h")
            self.h2d.append(StrictReceiver(h_label, KeyEpoch(h_label, 0, s.h2d_key, s.h2d_mask), policy))
            self.d2h.append(Sender(d_label, KeyEpoch(d_label, 0, s.d2h_key, s.d2h_mask), policy))
        self._scratch = bytearray(0)
        self.accepted = 0

    def _channel(self, ce: int) -> StrictReceiver:
        if not 0 <= ce < len(self.h2d):
            raise InvalidArgument(f"no channel {ce}; this session has {len(self.h2d)}")
        return self.h2d[ce]

    def _scratch_view(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def receive(self, ce: int, kind: MsgKind, message: Buffer, dst: memoryview | None = None) -> None:
        """Consume the next H2D message of channel `ce` with the endpoint's own counter."""
        rx = self._channel(ce)
        if kind == MsgKind.DATA:
            if dst is None:
                raise InvalidArgument("a DATA message needs a destination")
            rx.open_next(message, dst)
            self.accepted += 1
        elif kind == MsgKind.NOP:
            if len(message) != NOP_MESSAGE_LEN:
                rx.kill("malformed NOP")
                raise TagMismatch(f"channel {rx.name}: NOP of {len(message)} bytes, expected {NOP_MESSAGE_LEN}")
            out = self._scratch_view(len(NOP_PLAINTEXT))
            rx.open_next(message, out)
            if bytes(out) != NOP_PLAINTEXT:
                rx.kill("NOP without the NOP pattern")
                raise TagMismatch(f"channel {rx.name}: authenticated message is not a NOP")
        elif kind == MsgKind.DISCARD:
            rx.open_next(message, self._scratch_view(len(message) - TAG_LEN))
        else:
            raise InvalidArgument(f"{kind.name} is not an H2D message")

    def rotate_iv(self, ce: int, new_chan_ctr: int) -> None:
        self._channel(ce).rotate_iv(new_chan_ctr)

    def rotate_key(self, ce: int, new_version: int) -> None:
        self._channel(ce).rotate_key(new_version)

    def rotate_d2h_key(self, ce: int) -> int:
        return self.d2h[ce].rotate_key()

    def rotate_d2h_iv(self, ce: int) -> int:
        return self.d2h[ce].rotate_iv()

    def send(self, ce: int, src: Buffer, slot: memoryview) -> tuple[int, int]:
        """Encrypt one D2H message with the endpoint's own counter; returns (key_version, chan_ctr)."""
        if not 0 <= ce < len(self.d2h):
            raise InvalidArgument(f"no channel {ce}")
        tx = self.d2h[ce]
        iv = tx.reserve()
        tx.seal_into(iv, src, slot)
        tx.submit(iv)
        return iv.version, iv.chan_ctr

    @property
    def dead(self) -> str | None:
        for ch in (*self.h2d, *self.d2h):
            if ch.dead is not None:
                return f"{ch.name}: {ch.dead}"
        return None

    def check_alive(self) -> None:
        reason = self.dead
        if reason is not None:
            raise ChannelDead(reason)

    def snapshot(self) -> list[dict[str, Any]]:
        return [c.snapshot() for c in (*self.h2d, *self.d2h)]

    def close(self) -> None:
        for ch in (*self.h2d, *self.d2h):
            ch.close()
