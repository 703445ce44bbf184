"""The H100 confidential-computing channel model (docs/design.md, the channel model), shared by daemon and endpoint.

One `Sender` or receiver per direction of a channel. The sender reserves IVs in the order the receiver
will consume them and may encrypt with a reserved IV at any time, exactly once. The strict receiver
(the GPU side of H2D) never takes an IV from the sender: it decrypts message k with its own counter k,
so a replayed, reordered, dropped or tampered message fails the tag check and kills the channel.
The predicting receiver (the CPU side of D2H) guesses each IV itself and may decrypt out of order.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from . import crypto
from .crypto import NONCE_LEN, TAG_LEN
from .errors import (
    ChannelDead,
    InvalidArgument,
    IvOverflow,
    IvReuse,
    KeyExhausted,
    KeyVersionExpired,
    OutOfOrder,
    SlotError,
    TagMismatch,
    UnreservedIv,
)
from .keymem import LockedKey
from .keys import rotate_key

MSG_CTR_MAX: Final = 0xFFFF_FFFF
CHAN_CTR_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF
KEY_RING_SIZE: Final = 16
DEFAULT_UPPER: Final = 24_296_003_999
DEFAULT_GAP: Final = 1_000_000_000
DEFAULT_IV_ROTATION_REMAINING: Final = 2**31
_NONCE_LAYOUT: Final = struct.Struct("<IQ")


@dataclass(frozen=True)
class RotationPolicy:
    """Key- and IV-rotation thresholds. The real defaults never trigger in tests, so they are settings."""

    upper: int = DEFAULT_UPPER
    lower: int = DEFAULT_UPPER - DEFAULT_GAP
    iv_rotation_remaining: int = DEFAULT_IV_ROTATION_REMAINING

    def __post_init__(self) -> None:
        if not 0 < self.lower < self.upper:
            raise InvalidArgument(f"need 0 < lower < upper, got lower={self.lower} upper={self.upper}")
        if not 0 <= self.iv_rotation_remaining < MSG_CTR_MAX:
            raise InvalidArgument("iv_rotation_remaining must be in [0, 0xFFFFFFFF)")

    @classmethod
    def with_upper(cls, upper: int, iv_rotation_remaining: int = DEFAULT_IV_ROTATION_REMAINING) -> RotationPolicy:
        """Lower = upper - 1e9 as in the driver, or half of upper when upper is small (tests)."""
        lower = upper - DEFAULT_GAP if upper > 2 * DEFAULT_GAP else upper // 2
        return cls(upper=upper, lower=max(1, lower), iv_rotation_remaining=iv_rotation_remaining)


def make_nonce(mask: bytes, chan_ctr: int, msg_ctr: int) -> bytes:
    """nonce = (LE32(msg_ctr) || LE64(chan_ctr)) XOR mask."""
    raw = _NONCE_LAYOUT.pack(msg_ctr, chan_ctr)
    return (int.from_bytes(raw, "little") ^ int.from_bytes(mask, "little")).to_bytes(NONCE_LEN, "little")


class KeyEpoch:
    """One version of one direction's key: the key (in locked memory), its IV mask and its usage."""

    __slots__ = ("_key", "aead", "label", "mask", "tag", "usage_bytes", "usage_msgs", "version")

    def __init__(self, label: str, version: int, key: bytes, mask: bytes) -> None:
        if len(mask) != NONCE_LEN:
            raise InvalidArgument(f"IV mask must be {NONCE_LEN} bytes, got {len(mask)}")
        self.aead: crypto.Aead = crypto.new_aead(key)
        self._key = LockedKey(key)
        self.label = label
        self.version = version
        self.mask = bytes(mask)
        self.tag = crypto.key_tag(key)
        self.usage_bytes = 0
        self.usage_msgs = 0

    @property
    def usage(self) -> int:
        """Driver accounting: bytes/16 + messages."""
        return self.usage_bytes // 16 + self.usage_msgs

    def key_bytes(self) -> bytes:
        """For handing the key to a crypto worker; never log or store the result."""
        return self._key.reveal()

    def rotated(self) -> KeyEpoch:
        key, mask = rotate_key(self._key.reveal(), self.label)
        return KeyEpoch(self.label, self.version + 1, key, mask)

    def wipe(self) -> None:
        self._key.wipe()

    def __repr__(self) -> str:
        return f"<KeyEpoch {self.label} v{self.version} usage={self.usage}>"


class _Direction:
    """Counters, epoch and liveness common to both ends of one direction."""

    def __init__(self, name: str, epoch: KeyEpoch, policy: RotationPolicy) -> None:
        self.name = name
        self.epoch = epoch
        self.policy = policy
        self.chan_ctr = 0
        self.msg_ctr = 0
        self.dead: str | None = None
        self.messages = 0

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise ChannelDead(f"channel {self.name} is dead ({self.dead}); open a new session for new keys")

    def kill(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason

    def _charge(self, nbytes: int) -> None:
        self.epoch.usage_bytes += nbytes
        self.epoch.usage_msgs += 1
        self.messages += 1
        if self.epoch.usage > self.policy.upper:
            self.kill(f"key v{self.epoch.version} passed the upper usage threshold without a rotation")
            raise KeyExhausted(f"channel {self.name}: key usage {self.epoch.usage} > upper {self.policy.upper}")

    @property
    def key_rotation_pending(self) -> bool:
        return self.epoch.usage >= self.policy.lower

    @property
    def iv_rotation_due(self) -> bool:
        return MSG_CTR_MAX - self.msg_ctr <= self.policy.iv_rotation_remaining

    def _advance_iv_epoch(self) -> None:
        if self.chan_ctr >= CHAN_CTR_MAX:
            self.kill("channel counter exhausted")
            raise ChannelDead(f"channel {self.name}: channel counter exhausted")
        self.chan_ctr += 1
        self.msg_ctr = 0

    def _advance_key_epoch(self) -> None:
        old = self.epoch
        self.epoch = old.rotated()
        old.wipe()
        self.msg_ctr = 0

    def snapshot(self) -> dict[str, Any]:
        """Counters for status output; never the key or the mask."""
        return {
            "name": self.name,
            "key_version": self.epoch.version,
            "chan_ctr": self.chan_ctr,
            "msg_ctr": self.msg_ctr,
            "messages": self.messages,
            "key_usage": self.epoch.usage,
            "key_rotation_pending": self.key_rotation_pending,
            "dead": self.dead,
        }

    def close(self) -> None:
        self.epoch.wipe()


class ReservedIv:
    """An IV handed out by `Sender.reserve`; usable once (the driver's "fresh" flag)."""

    __slots__ = ("chan_ctr", "fresh", "msg_ctr", "nonce", "sender", "version")

    def __init__(self, sender: Sender, version: int, chan_ctr: int, msg_ctr: int, nonce: bytes) -> None:
        self.sender = sender
        self.version = version
        self.chan_ctr = chan_ctr
        self.msg_ctr = msg_ctr
        self.nonce = nonce
        self.fresh = True

    @property
    def position(self) -> tuple[int, int, int]:
        return (self.version, self.chan_ctr, self.msg_ctr)

    def __repr__(self) -> str:
        state = "fresh" if self.fresh else "used"
        return f"<ReservedIv v{self.version} c{self.chan_ctr} m{self.msg_ctr} {state}>"


class Sender(_Direction):
    """The encrypting end: reserve in receiver order, encrypt in any order, submit in IV order."""

    def __init__(self, name: str, epoch: KeyEpoch, policy: RotationPolicy) -> None:
        super().__init__(name, epoch, policy)
        self._outstanding: dict[int, ReservedIv] = {}
        self.submitted = 0  # msg_ctr of the last message submitted in this IV epoch

    def reserve(self) -> ReservedIv:
        self._check_alive()
        if self.msg_ctr >= MSG_CTR_MAX:
            raise IvOverflow(f"channel {self.name}: IV overflow (message counter at 0xFFFFFFFF); rotate the IV")
        self.msg_ctr += 1
        iv = ReservedIv(
            self,
            self.epoch.version,
            self.chan_ctr,
            self.msg_ctr,
            make_nonce(self.epoch.mask, self.chan_ctr, self.msg_ctr),
        )
        self._outstanding[iv.msg_ctr] = iv
        return iv

    def _validate(self, iv: ReservedIv) -> None:
        if iv.sender is not self:
            raise UnreservedIv(f"IV {iv.position} was not reserved by channel {self.name}")
        if not iv.fresh:
            raise IvReuse(f"channel {self.name}: IV {iv.position} was already used; a reserved IV is used once")
        if iv.version != self.epoch.version:
            raise UnreservedIv(f"channel {self.name}: IV {iv.position} was abandoned by a key rotation")
        if iv.chan_ctr != self.chan_ctr:
            raise UnreservedIv(f"channel {self.name}: IV {iv.position} was abandoned by an IV rotation")
        if self._outstanding.get(iv.msg_ctr) is not iv:
            raise UnreservedIv(f"channel {self.name}: IV {iv.position} is not outstanding")

    def take(self, iv: ReservedIv, nbytes: int) -> bytes:
        """Consume the reservation for one message of `nbytes` and return its nonce."""
        self._check_alive()
        self._validate(iv)
        if nbytes < 0:
            raise InvalidArgument("message length must be >= 0")
        iv.fresh = False
        del self._outstanding[iv.msg_ctr]
        self._charge(nbytes)
        return iv.nonce

    def seal_into(self, iv: ReservedIv, src: crypto.Buffer, dst: memoryview) -> None:
        """Encrypt in this process (NOPs, the endpoint's D2H, tests); workers use `take` + the job path."""
        if len(dst) != len(src) + TAG_LEN:
            raise SlotError(f"output must be exactly {len(src) + TAG_LEN} bytes, got {len(dst)}")
        nonce = self.take(iv, len(src))
        crypto.seal_into(self.epoch.aead, self.epoch.tag, nonce, src, dst)

    def submit(self, iv: ReservedIv) -> None:
        """Record that the message under `iv` goes to the receiver now; it must be the next in IV order."""
        self._check_alive()
        if iv.sender is not self or iv.version != self.epoch.version or iv.chan_ctr != self.chan_ctr:
            raise UnreservedIv(f"channel {self.name}: IV {iv.position} does not belong to the current IV epoch")
        if iv.fresh:
            raise OutOfOrder(f"channel {self.name}: IV {iv.position} submitted before anything was encrypted with it")
        if iv.msg_ctr != self.submitted + 1:
            raise OutOfOrder(f"channel {self.name}: IV {iv.position} submitted, expected message {self.submitted + 1}")
        self.submitted = iv.msg_ctr

    @property
    def outstanding(self) -> int:
        return len(self._outstanding)

    def rotate_iv(self) -> int:
        """chan_ctr+1, msg_ctr=0, same key; abandons all outstanding reservations; returns the new chan_ctr."""
        self._check_alive()
        self._advance_iv_epoch()
        self._outstanding.clear()
        self.submitted = 0
        return self.chan_ctr

    def rotate_key(self) -> int:
        """New key and mask, msg_ctr=0, chan_ctr unchanged; abandons outstanding reservations."""
        self._check_alive()
        self._advance_key_epoch()
        self._outstanding.clear()
        self.submitted = 0
        return self.epoch.version


class StrictReceiver(_Direction):
    """The GPU side of H2D: decrypts message k with its own counter k and dies on the first failure.

    `open_next` decrypts on the CPU. A GPU endpoint splits it: `advance` (the nonce of message k),
    its own decryption, then `accept` or `reject`.
    """

    def advance(self) -> bytes:
        self._check_alive()
        if self.msg_ctr >= MSG_CTR_MAX:
            self.kill("IV overflow")
            raise IvOverflow(f"channel {self.name}: IV overflow at the receiver")
        self.msg_ctr += 1
        return make_nonce(self.epoch.mask, self.chan_ctr, self.msg_ctr)

    def accept(self, nbytes: int) -> None:
        self._charge(nbytes)

    def reject(self) -> TagMismatch:
        where = f"key v{self.epoch.version} chan {self.chan_ctr} msg {self.msg_ctr}"
        self.kill(f"tag mismatch at {where}")
        return TagMismatch(f"channel {self.name}: tag mismatch at {where} (tampered, replayed, reordered or dropped)")

    def open_next(self, data: crypto.Buffer, out: memoryview) -> None:
        """Decrypt message k into `out`; `data` may be host-writable (`crypto.open_into` reads it once)."""
        nonce = self.advance()
        try:
            crypto.open_into(self.epoch.aead, nonce, data, out)
        except TagMismatch:
            raise self.reject() from None
        self.accept(len(out))

    def account_unverified(self, nbytes: int) -> None:
        """Benchmarks that verify a sample: consume message k's counter without decrypting it."""
        self._check_alive()
        if self.msg_ctr >= MSG_CTR_MAX:
            raise IvOverflow(f"channel {self.name}: IV overflow at the receiver")
        self.msg_ctr += 1
        self._charge(nbytes)

    def rotate_iv(self, new_chan_ctr: int) -> None:
        self._check_alive()
        if new_chan_ctr != self.chan_ctr + 1:
            self.kill("IV rotation out of sequence")
            raise ChannelDead(f"channel {self.name}: IV rotation to {new_chan_ctr}, expected {self.chan_ctr + 1}")
        self._advance_iv_epoch()

    def rotate_key(self, new_version: int) -> None:
        self._check_alive()
        if new_version != self.epoch.version + 1:
            self.kill("key rotation out of sequence")
            raise ChannelDead(
                f"channel {self.name}: key rotation to v{new_version}, expected v{self.epoch.version + 1}"
            )
        self._advance_key_epoch()


@dataclass(frozen=True)
class Prediction:
    """The CPU side's own guess of a D2H message's IV."""

    version: int
    chan_ctr: int
    msg_ctr: int
    nonce: bytes


class PredictingReceiver(_Direction):
    """The CPU side of D2H: predicts each IV in arrival order and may decrypt out of order.

    It keeps the last 16 key versions so data encrypted just before a rotation still decrypts.
    """

    def __init__(self, name: str, epoch: KeyEpoch, policy: RotationPolicy) -> None:
        super().__init__(name, epoch, policy)
        self._ring: OrderedDict[int, KeyEpoch] = OrderedDict([(epoch.version, epoch)])
        self._next: dict[tuple[int, int], int] = {}

    def predict(self, version: int, chan_ctr: int) -> Prediction:
        self._check_alive()
        epoch = self._ring.get(version)
        if epoch is None:
            self.kill(f"D2H data under expired key v{version}")
            raise KeyVersionExpired(f"channel {self.name}: key v{version} is older than the last {KEY_RING_SIZE}")
        if chan_ctr > self.chan_ctr and version == self.epoch.version:
            raise InvalidArgument(f"channel {self.name}: D2H chan {chan_ctr} is ahead of {self.chan_ctr}")
        msg = self._next.get((version, chan_ctr), 0) + 1
        if msg > MSG_CTR_MAX:
            raise IvOverflow(f"channel {self.name}: D2H IV overflow")
        self._next[(version, chan_ctr)] = msg
        return Prediction(version, chan_ctr, msg, make_nonce(epoch.mask, chan_ctr, msg))

    def aead_for(self, version: int) -> crypto.Aead:
        epoch = self._ring.get(version)
        if epoch is None:
            raise KeyVersionExpired(f"channel {self.name}: key v{version} expired")
        return epoch.aead

    def open(self, pred: Prediction, data: crypto.Buffer, out: memoryview) -> None:
        """Decrypt one predicted message here, race-proof like every `crypto.open_into`; fatal on failure.

        Workers use `aead_for` + the job path, which ends in the same function.
        """
        self._check_alive()
        try:
            crypto.open_into(self.aead_for(pred.version), pred.nonce, data, out)
        except TagMismatch:
            self.fail(pred)
            raise TagMismatch(f"channel {self.name}: D2H tag mismatch at v{pred.version} msg {pred.msg_ctr}") from None
        self.account(len(out))

    def account(self, nbytes: int) -> None:
        self._charge(nbytes)

    def fail(self, pred: Prediction) -> None:
        self.kill(f"D2H tag mismatch at key v{pred.version} chan {pred.chan_ctr} msg {pred.msg_ctr}")

    def rotate_iv(self) -> int:
        self._check_alive()
        self._advance_iv_epoch()
        return self.chan_ctr

    def rotate_key(self) -> int:
        self._check_alive()
        new = self.epoch.rotated()
        self.epoch = new
        self.msg_ctr = 0
        self._ring[new.version] = new
        while len(self._ring) > KEY_RING_SIZE:
            _, old = self._ring.popitem(last=False)
            old.wipe()
        return new.version

    def close(self) -> None:
        for epoch in self._ring.values():
            epoch.wipe()
