"""PipeLLM client SDK: sessions, regions and confidential transfers through pipellmd.

The SDK never imports the daemon; both share the channel model in this package.
"""

from ._core import DaemonError, Intent
from ._dataplane import DaemonUnavailable, default_socket
from .client import Client, Session
from .errors import ChannelDead, InvalidArgument, PipeLLMError, TagMismatch
from .regions import Region

__version__ = "0.1.0"

__all__ = [
    "ChannelDead",
    "Client",
    "DaemonError",
    "DaemonUnavailable",
    "Intent",
    "InvalidArgument",
    "PipeLLMError",
    "Region",
    "Session",
    "TagMismatch",
    "default_socket",
]
