"""The daemon's own typed errors, at the bottom of its import graph.

The pipeline and the bounce pool raise them; `refusal.from_exception` maps them to status codes. They
live here, below both, so that mapping needs no import of the layers that raise them.
"""

from __future__ import annotations

from pipellm_client.errors import PipeLLMError


class CommitAborted(PipeLLMError):
    """A worker died under this commit; the IVs involved were abandoned and the SDK retries from plaintext."""


class ProtocolViolation(PipeLLMError):
    """The client did something the protocol forbids (releasing a slot it does not hold, say)."""


class PoolExhausted(PipeLLMError):
    """No arena left within pool_bytes; the caller gets RESOURCE_EXHAUSTED."""
