"""Session key agreement (a stand-in for SPDM) and the key schedule of the channels.

SPDM on Hopper runs ECDHE on P-384; we do the same over the session's control plane, turn the shared
secret into a 32-byte master secret, and derive each channel key as HKDF-SHA256-Expand(master, label, 32)
with NVIDIA-style labels: one copy engine index per channel, one label per direction.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from .crypto import KEY_LEN, NONCE_LEN
from .errors import InvalidArgument, PipeLLMError

MASTER_LEN: Final = 32
_MASTER_INFO: Final = b"PipeLLM SPDM stand-in master secret v1"
_MASK_WRAP_LABEL: Final = b"Lmask_transport"
_POINT_LEN: Final = 97  # SEC1 uncompressed P-384 point


class KeyAgreementError(PipeLLMError):
    """The peers did not end up with the same secrets (bad point, wrong transcript, tampered masks)."""


def channel_label(ce_index: int, direction: str) -> str:
    """NVIDIA-style key label, e.g. Lce00_h2d_user."""
    if not 0 <= ce_index <= 99:
        raise InvalidArgument(f"copy engine index must be 0..99, got {ce_index}")
    if direction not in ("h2d", "d2h"):
        raise InvalidArgument(f"direction must be h2d or d2h, got {direction!r}")
    return f"Lce{ce_index:02d}_{direction}_user"


def hkdf_expand(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDFExpand(algorithm=hashes.SHA256(), length=length, info=info).derive(secret)


def derive_channel_key(master: bytes, label: str) -> bytes:
    if len(master) != MASTER_LEN:
        raise InvalidArgument(f"master secret must be {MASTER_LEN} bytes, got {len(master)}")
    return hkdf_expand(master, label.encode(), KEY_LEN)


def rotate_key(key: bytes, label: str) -> tuple[bytes, bytes]:
    """Next key version as NVIDIA derives it: HKDF-Expand(SHA256(key), label, 32), plus a fresh IV mask.

    The mask is derived from the same input under a distinct label, so both sides agree on it without
    sending anything; a new key with a new mask is what the driver's rotation yields.
    """
    seed = hashlib.sha256(key).digest()
    return hkdf_expand(seed, label.encode(), KEY_LEN), hkdf_expand(seed, label.encode() + b"_ivmask", NONCE_LEN)


@dataclass(frozen=True)
class Transcript:
    """Both public keys in a fixed order; binds the master secret and the mask transport to this handshake."""

    daemon_public: bytes
    endpoint_public: bytes

    def digest(self) -> bytes:
        return hashlib.sha256(b"pipellm-handshake\0" + self.daemon_public + self.endpoint_public).digest()


class KeyAgreement:
    """One side of an ephemeral ECDH P-384 exchange."""

    def __init__(self) -> None:
        self._private = ec.generate_private_key(ec.SECP384R1())
        self.public_bytes = self._private.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

    def master_secret(self, peer_public: bytes, transcript: Transcript) -> bytes:
        if len(peer_public) != _POINT_LEN:
            raise KeyAgreementError(f"peer public key must be a {_POINT_LEN}-byte SEC1 P-384 point")
        try:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), peer_public)
        except ValueError:
            raise KeyAgreementError("peer public key is not a valid P-384 point") from None
        shared = self._private.exchange(ec.ECDH(), peer)
        return HKDF(algorithm=hashes.SHA256(), length=MASTER_LEN, salt=transcript.digest(), info=_MASTER_INFO).derive(
            shared
        )


def new_mask() -> bytes:
    """The endpoint chooses IV masks, as the GPU does."""
    return os.urandom(NONCE_LEN)


def seal_masks(master: bytes, transcript: Transcript, masks: list[bytes]) -> bytes:
    """Carry the endpoint's masks to the daemon under the new master; doubles as key confirmation."""
    if any(len(m) != NONCE_LEN for m in masks):
        raise InvalidArgument("each IV mask must be 12 bytes")
    wrap = AESGCM(hkdf_expand(master, _MASK_WRAP_LABEL, KEY_LEN))
    return wrap.encrypt(bytes(NONCE_LEN), b"".join(masks), transcript.digest())


def open_masks(master: bytes, transcript: Transcript, sealed: bytes, count: int) -> list[bytes]:
    if len(sealed) != count * NONCE_LEN + 16:
        raise KeyAgreementError(f"sealed masks must be {count * NONCE_LEN + 16} bytes, got {len(sealed)}")
    wrap = AESGCM(hkdf_expand(master, _MASK_WRAP_LABEL, KEY_LEN))
    try:
        raw = wrap.decrypt(bytes(NONCE_LEN), sealed, transcript.digest())
    except InvalidTag:
        raise KeyAgreementError("IV masks failed authentication: the peers disagree on the master secret") from None
    return [raw[i : i + NONCE_LEN] for i in range(0, len(raw), NONCE_LEN)]
