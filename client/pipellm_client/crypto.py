"""The one place AES-GCM runs on the CPU, so that every encryption can be audited in tests.

`seal_into` and `open_into` write straight into caller buffers (no intermediate copy). An optional
auditor sees (key tag, nonce, plaintext) for every encryption; the property tests use it to prove
that no (key, nonce) pair ever encrypts two different messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import InvalidArgument, SlotError, TagMismatch

KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16

Buffer = bytes | bytearray | memoryview
Auditor = Callable[[bytes, bytes, memoryview], None]

_auditor: Auditor | None = None


def set_auditor(auditor: Auditor | None) -> None:
    """Install (or remove) the hook that sees every CPU encryption; tests only."""
    global _auditor
    _auditor = auditor


def auditor() -> Auditor | None:
    return _auditor


def key_tag(key: Buffer) -> bytes:
    """A non-secret identifier of a key for audit records (never the key itself)."""
    return hashlib.sha256(b"pipellm-audit-tag\0" + bytes(key)).digest()[:16]


def new_aead(key: Buffer) -> AESGCM:
    if len(key) != KEY_LEN:
        raise InvalidArgument(f"AES-256-GCM key must be {KEY_LEN} bytes, got {len(key)}")
    return AESGCM(bytes(key))


def check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_LEN:
        raise InvalidArgument(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")


def seal_into(aead: AESGCM, tag: bytes, nonce: bytes, src: Buffer, dst: memoryview) -> None:
    """Encrypt `src` into `dst` (exactly len(src)+16 bytes: ciphertext || tag)."""
    check_nonce(nonce)
    if len(dst) != len(src) + TAG_LEN:
        raise SlotError(f"output must be exactly {len(src) + TAG_LEN} bytes (data + tag), got {len(dst)}")
    if _auditor is not None:
        _auditor(tag, nonce, memoryview(src))
    aead.encrypt_into(nonce, src, None, dst)


def open_into(aead: AESGCM, nonce: bytes, data: Buffer, dst: memoryview) -> None:
    """Decrypt ciphertext||tag into `dst`; on a tag failure `dst` is wiped before raising."""
    check_nonce(nonce)
    if len(data) < TAG_LEN:
        raise SlotError(f"message of {len(data)} bytes is shorter than a tag")
    if len(dst) != len(data) - TAG_LEN:
        raise SlotError(f"output must be exactly {len(data) - TAG_LEN} bytes, got {len(dst)}")
    try:
        aead.decrypt_into(nonce, data, None, dst)
    except InvalidTag:
        # OpenSSL writes plaintext before it checks the tag: never leave it readable.
        dst[:] = bytes(len(dst))
        raise TagMismatch("authentication tag mismatch") from None
