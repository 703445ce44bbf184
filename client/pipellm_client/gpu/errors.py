"""Errors of the GPU AES-GCM path."""

from __future__ import annotations


class TagMismatch(Exception):
    """The GCM tag did not authenticate the ciphertext (tampering, wrong key or wrong nonce).

    In the channel model this is fatal for the channel: nothing of the message was written.
    """
