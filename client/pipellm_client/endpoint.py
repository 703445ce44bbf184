"""The GPU side of the channel: `CpuEndpoint` emulates it on the CPU; `gpu.endpoint.CudaEndpoint` runs it
on a CUDA device. Both follow the same rules, in `Endpoint`:

H2D messages are consumed strictly in the endpoint's own IV order (DATA into the destination, NOP and
DISCARD verified and dropped), rotations apply where the ordered stream says, and D2H data is encrypted
with the endpoint's own counter. A tag failure kills that channel and leaves nothing unauthenticated in
the destination.
"""

from __future__ import annotations

import contextlib
import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from . import crypto
from .channel import KeyEpoch, RotationPolicy, Sender, StrictReceiver
from .crypto import TAG_LEN, Buffer
from .errors import InvalidArgument, TagMismatch
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


SPARE_BYTES_MAX: Final = 64 << 20  # held-message buffers kept for reuse once their ciphertext is in a slot


class HeldMessage(ABC):
    """A D2H message encrypted while every bounce slot was taken, kept in the endpoint's own memory (host
    memory of this process, or device memory) until the daemon frees a slot: `d2h` need not wait for one."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes  # ciphertext and tag

    @abstractmethod
    def move_to(self, slot: memoryview) -> None:
        """Copy the message into its slot (complete on return) and let go of the memory it was held in."""


class SpareBuffers:
    """Held-message buffers kept for reuse, by size (nearly all are one chunk plus its tag).

    A fresh bytearray of a chunk's size costs more than encrypting into it: the allocator maps new pages and
    zeroes them (a page fault each), and unmaps them again when the buffer is dropped. They only ever hold
    ciphertext, so reuse exposes nothing.
    """

    def __init__(self, limit: int = SPARE_BYTES_MAX) -> None:
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0
        self._limit = limit

    def take(self, n: int) -> bytearray:
        free = self._free.get(n)
        if free:
            self._bytes -= n
            return free.pop()
        return bytearray(n)

    def give(self, buf: bytearray) -> None:
        n = len(buf)
        if self._bytes + n <= self._limit:
            self._free.setdefault(n, []).append(buf)
            self._bytes += n


class _HeldBytes(HeldMessage):
    def __init__(self, buf: bytearray, spare: SpareBuffers) -> None:
        super().__init__(len(buf))
        self._buf = buf
        self._spare = spare

    def move_to(self, slot: memoryview) -> None:
        slot[:] = self._buf
        self._spare.give(self._buf)


class Endpoint(ABC):
    """One session's endpoint: a strict H2D receiver and a D2H sender per copy engine."""

    kind = "abstract"

    def __init__(self, secrets: list[ChannelSecrets], policy: RotationPolicy) -> None:
        self.h2d: list[StrictReceiver] = []
        self.d2h: list[Sender] = []
        for s in secrets:
            h_label, d_label = channel_label(s.ce_index, "h2d"), channel_label(s.ce_index, "d2h")
            self.h2d.append(StrictReceiver(h_label, KeyEpoch(h_label, 0, s.h2d_key, s.h2d_mask), policy))
            self.d2h.append(Sender(d_label, KeyEpoch(d_label, 0, s.d2h_key, s.d2h_mask), policy))
        self.accepted = 0
        self.next_staged: int | None = None  # a device-staging slot already holding the next DATA message

    # -- what an implementation provides ----------------------------------------------------------
    @abstractmethod
    def _open(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        """Decrypt the next message into `out` (a destination view) or raise rx.reject()."""

    @abstractmethod
    def _open_to_host(self, rx: StrictReceiver, message: Buffer, n: int) -> bytes:
        """Decrypt the next message and return its plaintext on the host (small messages: NOPs)."""

    @abstractmethod
    def _open_discard(self, rx: StrictReceiver, message: Buffer) -> None:
        """Decrypt and verify the next message, keep nothing."""

    @abstractmethod
    def _seal(self, tx: Sender, src: Any, slot: memoryview) -> tuple[int, int]:
        """Encrypt one D2H message from device data into a host slot; returns (key_version, chan_ctr)."""

    @abstractmethod
    def _hold(self, tx: Sender, src: Any) -> tuple[HeldMessage, int, int]:
        """Encrypt one D2H message into the endpoint's own memory, for a slot to be chosen later; returns it
        with (key_version, chan_ctr). Its counter is spent now: messages reach the daemon in this order."""

    @abstractmethod
    def dest_view(self, dst: Any) -> Any:
        """A flat byte view of a destination this endpoint can write (host or device memory)."""

    @abstractmethod
    def source_view(self, src: Any) -> Any:
        """A flat byte view of device data this endpoint can encrypt."""

    @abstractmethod
    def copy_plain(self, src: memoryview, out: Any) -> None:
        """Plain mode (NO ENCRYPTION): copy host bytes straight into the destination."""

    def attach_arena(self, arena: Any) -> None:  # noqa: B027 - optional hook, a no-op for the CPU
        """The session's bounce arena is mapped; a GPU endpoint pins it for DMA here."""

    @abstractmethod
    def to_host(self, src: Any) -> memoryview:
        """Device data as host bytes (plain mode's D2H copy)."""

    # -- the rules ------------------------------------------------------------------------------------
    def _channel(self, ce: int) -> StrictReceiver:
        if not 0 <= ce < len(self.h2d):
            raise InvalidArgument(f"no channel {ce}; this session has {len(self.h2d)}")
        return self.h2d[ce]

    def receive(self, ce: int, kind: MsgKind, message: Buffer, dst: Any = None) -> None:
        """Consume the next H2D message of channel `ce` with the endpoint's own counter."""
        rx = self._channel(ce)
        if kind == MsgKind.DATA:
            if dst is None:
                raise InvalidArgument("a DATA message needs a destination")
            self._open(rx, message, dst)
            self.accepted += 1
        elif kind == MsgKind.NOP:
            if len(message) != NOP_MESSAGE_LEN:
                rx.kill("malformed NOP")
                raise TagMismatch(f"channel {rx.name}: NOP of {len(message)} bytes, expected {NOP_MESSAGE_LEN}")
            if self._open_to_host(rx, message, len(NOP_PLAINTEXT)) != NOP_PLAINTEXT:
                rx.kill("NOP without the NOP pattern")
                raise TagMismatch(f"channel {rx.name}: authenticated message is not a NOP")
        elif kind == MsgKind.DISCARD:
            self._open_discard(rx, message)
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

    def send(self, ce: int, src: Any, slot: memoryview) -> tuple[int, int]:
        """Encrypt one D2H message with the endpoint's own counter; returns (key_version, chan_ctr)."""
        return self._seal(self._sender(ce), src, slot)

    def hold(self, ce: int, src: Any) -> tuple[HeldMessage, int, int]:
        """`send` while no slot is free: the ciphertext waits in the endpoint's memory (`HeldMessage`)."""
        return self._hold(self._sender(ce), src)

    def _sender(self, ce: int) -> Sender:
        if not 0 <= ce < len(self.d2h):
            raise InvalidArgument(f"no channel {ce}")
        return self.d2h[ce]

    @property
    def dead(self) -> str | None:
        for ch in (*self.h2d, *self.d2h):
            if ch.dead is not None:
                return f"{ch.name}: {ch.dead}"
        return None

    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Messages of one commit or ring batch, run together where the endpoint can (the CUDA one: one
        launch set per batch, every tag checked before any destination is written). Here: at once."""
        return contextlib.nullcontext()

    def flush(self) -> None:  # noqa: B027 - a no-op where nothing is queued
        """Run whatever a batch has queued so far (D2H ciphertext must be in its slot before it is sent)."""

    def close(self) -> None:
        for ch in (*self.h2d, *self.d2h):
            ch.close()


class CpuEndpoint(Endpoint):
    """The endpoint emulated on the CPU: destinations are host arrays."""

    kind = "cpu"

    def __init__(self, secrets: list[ChannelSecrets], policy: RotationPolicy) -> None:
        super().__init__(secrets, policy)
        self._scratch = bytearray(0)
        self._spare = SpareBuffers()

    def _scratch_view(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def _open(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        # Straight into the destination, wiped on failure: cheaper than scratch + copy (bench/engine.py).
        # `message` is in the host-writable arena; open_into copies it through private memory piece by
        # piece, so the host cannot change a byte between the tag check and the decryption.
        rx.open_next(message, out)

    def _open_to_host(self, rx: StrictReceiver, message: Buffer, n: int) -> bytes:
        out = self._scratch_view(n)
        rx.open_next(message, out)
        return bytes(out)

    def _open_discard(self, rx: StrictReceiver, message: Buffer) -> None:
        rx.open_next(message, self._scratch_view(len(message) - TAG_LEN))

    def _seal(self, tx: Sender, src: Any, slot: memoryview) -> tuple[int, int]:
        iv = tx.reserve()
        tx.seal_into(iv, src, slot)
        tx.submit(iv)
        return iv.version, iv.chan_ctr

    def _hold(self, tx: Sender, src: Any) -> tuple[HeldMessage, int, int]:
        buf = self._spare.take(len(src) + TAG_LEN)
        version, chan = self._seal(tx, src, memoryview(buf))
        return _HeldBytes(buf, self._spare), version, chan

    def dest_view(self, dst: Any) -> memoryview:
        return host_dest_view(dst)

    def source_view(self, src: Any) -> memoryview:
        return host_source_view(src)

    def copy_plain(self, src: memoryview, out: Any) -> None:
        out[:] = src

    def to_host(self, src: Any) -> memoryview:
        return memoryview(src)


def host_dest_view(dst: Any) -> memoryview:
    """A writable byte view of a numpy array, CPU torch tensor or bytearray (C-contiguous)."""
    if type(dst) is np.ndarray and dst.dtype == np.uint8 and dst.ndim == 1:  # the hot path's usual buffer
        flags = dst.flags
        if flags.c_contiguous and flags.writeable:
            return memoryview(dst)  # type: ignore[arg-type]
    if hasattr(dst, "numpy") and hasattr(dst, "is_contiguous"):  # torch.Tensor (any dtype, bfloat16 too)
        if dst.device.type != "cpu":
            raise InvalidArgument("the CPU endpoint needs a CPU tensor; use the CUDA endpoint for GPU tensors")
        if not dst.is_contiguous():
            raise InvalidArgument("destination tensor must be contiguous")
        import torch

        dst = dst.detach().reshape(-1).view(torch.uint8).numpy()
    if isinstance(dst, memoryview | bytearray):
        return memoryview(dst).cast("B")
    arr = np.asarray(dst)
    if not arr.flags.c_contiguous:
        raise InvalidArgument("destination must be C-contiguous")
    if not arr.flags.writeable:
        raise InvalidArgument("destination is read-only")
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def host_source_view(src: Any) -> memoryview:
    """A byte view of host data: numpy array, CPU torch tensor or any buffer."""
    if hasattr(src, "numpy") and hasattr(src, "is_contiguous"):  # torch.Tensor (any dtype, bfloat16 too)
        import torch

        src = src.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    if isinstance(src, bytes | bytearray | memoryview):
        return memoryview(src).cast("B")
    arr = np.ascontiguousarray(src)
    return memoryview(arr.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


__all__ = [
    "NOP_MESSAGE_LEN",
    "NOP_PLAINTEXT",
    "ChannelSecrets",
    "CpuEndpoint",
    "Endpoint",
    "MsgKind",
    "crypto",
    "host_dest_view",
    "host_source_view",
]
