"""The one place AES-GCM runs on the CPU, so that every encryption can be audited in tests.

`seal_into` encrypts straight into the caller's buffer; `seal_job` is the same door for the crypto
workers' job path (in the worker processes and the pool's inline mode), without the argument checks. No
other code of the daemon or the SDK encrypts or decrypts channel data (`tests/test_layering.py` checks;
`keys.py` wraps the IV masks once per session under a key of their own).

`open_into` is the only CPU decryption: its ciphertext usually lies in the bounce arena, which the
untrusted host may rewrite at any moment, also while we decrypt. OpenSSL may read its input twice (GHASH,
then CTR), so a byte the host toggles between the two reads would pass the tag and still change the
plaintext. `open_into` therefore copies the message, piece by piece, into a small buffer private to this
thread and decrypts only from there: every ciphertext byte is read from shared memory exactly once, so
the tag covers exactly what was decrypted.

An optional auditor sees (key tag, nonce, plaintext) for every encryption that runs in its process; the
property tests use it to prove that no (key, nonce) pair ever encrypts two different messages. (A worker
process has none installed, so the pool audits each job it sends one, as it submits it.)
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import InvalidArgument, SlotError, TagMismatch

KEY_LEN: Final = 32
NONCE_LEN: Final = 12
TAG_LEN: Final = 16
# Ciphertext bytes copied into private memory per step of `open_into`: large enough that the per-step
# Python cost is small, small enough to stay in L2 between the copy and the decryption. Measured with
# `python -m bench.engine --open-only`: 32 < 64 < 128 < 256 KiB, 512 KiB no better than 256.
OPEN_PIECE: Final = 256 << 10

Buffer = bytes | bytearray | memoryview
Auditor = Callable[[bytes, bytes, memoryview], None]

_auditor: Auditor | None = None
_private = threading.local()  # per thread: the buffer `open_into` decrypts from


def set_auditor(auditor: Auditor | None) -> None:
    """Install (or remove) the hook that sees every CPU encryption; tests only."""
    global _auditor
    _auditor = auditor


def auditor() -> Auditor | None:
    return _auditor


def key_tag(key: Buffer) -> bytes:
    """A non-secret identifier of a key for audit records (never the key itself)."""
    return hashlib.sha256(b"pipellm-audit-tag\0" + bytes(key)).digest()[:16]


class Aead:
    """One AES-256-GCM key: OpenSSL's one-shot AEAD to seal, the raw block cipher for streamed opens, and
    the key's audit tag (`key_tag`). This module's functions are what use them.

    Both objects share one copy of the key bytes. `repr` never shows them.
    """

    __slots__ = ("_aes", "_gcm", "tag")

    def __init__(self, key: Buffer) -> None:
        if len(key) != KEY_LEN:
            raise InvalidArgument(f"AES-256-GCM key must be {KEY_LEN} bytes, got {len(key)}")
        raw = bytes(key)
        self._gcm = AESGCM(raw)
        self._aes = algorithms.AES(raw)
        self.tag = key_tag(raw)

    def encrypt_into(self, nonce: bytes, src: Buffer, dst: memoryview) -> None:
        """Unaudited, unchecked encryption: the library anchor of `bench/engine.py`, nothing else. The daemon
        and the SDK encrypt through `seal_into` and `seal_job`, which the auditor sees."""
        self._gcm.encrypt_into(nonce, src, None, dst)

    def __repr__(self) -> str:
        return "<Aead AES-256-GCM>"


def new_aead(key: Buffer) -> Aead:
    return Aead(key)


def check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_LEN:
        raise InvalidArgument(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")


def seal_into(aead: Aead, tag: bytes, nonce: bytes, src: Buffer, dst: memoryview) -> None:
    """Encrypt `src` into `dst` (exactly len(src)+16 bytes: ciphertext || tag)."""
    check_nonce(nonce)
    if len(dst) != len(src) + TAG_LEN:
        raise SlotError(f"output must be exactly {len(src) + TAG_LEN} bytes (data + tag), got {len(dst)}")
    if _auditor is not None:
        _auditor(tag, nonce, memoryview(src))
    aead._gcm.encrypt_into(nonce, src, None, dst)


def seal_job(aead: Aead, nonce: bytes, src: Buffer, dst: memoryview) -> None:
    """`seal_into` for a crypto worker's job: audited the same way (under `aead.tag`), without the checks.

    The pool built the job, so its nonce and ranges are right; a wrong length is OpenSSL's ValueError,
    which the worker reports as a failed job. Where no auditor is installed (a worker process, always)
    this is one test of a module global before OpenSSL: nothing per job.
    """
    if _auditor is not None:
        _auditor(aead.tag, nonce, memoryview(src))
    aead._gcm.encrypt_into(nonce, src, None, dst)


def _private_buffer(n: int) -> memoryview:
    """At least `n` bytes of this thread's own memory (the host never maps it)."""
    buf: bytearray | None = getattr(_private, "buf", None)
    if buf is None or len(buf) < n:
        buf = bytearray(max(n, OPEN_PIECE + TAG_LEN))
        _private.buf = buf
    return memoryview(buf)


def open_into(aead: Aead, nonce: bytes, data: Buffer, dst: memoryview, *, piece: int = OPEN_PIECE) -> None:
    """Decrypt ciphertext||tag into `dst`, reading each byte of `data` exactly once.

    `data` may be memory the host can write while we run; `dst` must be ours. The tag is copied first,
    then the ciphertext a `piece` at a time into private memory, and only that copy is authenticated and
    decrypted. On any failure `dst` is wiped before raising (TagMismatch for a bad tag), so nothing
    unauthenticated is ever left for the caller.
    """
    check_nonce(nonce)
    src = memoryview(data).cast("B")
    out = memoryview(dst).cast("B")
    n = len(src) - TAG_LEN
    if n < 0:
        raise SlotError(f"message of {len(src)} bytes is shorter than a tag ({TAG_LEN} bytes)")
    if len(out) != n:
        raise SlotError(f"output must be exactly {n} bytes, got {len(out)}")
    if piece < 1:
        raise InvalidArgument(f"piece must be at least 1 byte, got {piece}")
    try:
        if n <= piece:  # one copy of the whole message, then OpenSSL's one-shot: cheapest for NOPs
            priv = _private_buffer(n + TAG_LEN)[: n + TAG_LEN]
            priv[:] = src
            aead._gcm.decrypt_into(nonce, priv, None, out)
            return
        tag = bytes(src[n:])  # private before any ciphertext is read
        priv = _private_buffer(piece)
        dec = Cipher(aead._aes, modes.GCM(nonce, tag)).decryptor()
        for off in range(0, n, piece):
            end = min(off + piece, n)
            chunk = priv[: end - off]
            chunk[:] = src[off:end]
            dec.update_into(chunk, out[off:end])
        dec.finalize()
    except InvalidTag:
        _wipe(out)
        raise TagMismatch("authentication tag mismatch") from None
    except BaseException:
        _wipe(out)
        raise


def _wipe(out: memoryview) -> None:
    # Decryption writes plaintext before the tag is checked: never leave it readable.
    out[:] = bytes(len(out))
