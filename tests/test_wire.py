"""Protocol facts live in `pipellm_client.wire` alone: neither end spells them again.

Both ends import them (so they agree by construction); these checks keep a second spelling from coming
back: the ticket key, the socket paths, SCM_RIGHTS packing and a name -> pb.Mode table, anywhere in the
daemon or the SDK outside `wire.py` (generated code aside).
"""

from __future__ import annotations

import ast
import os
import socket
from pathlib import Path

import pytest
from pipellm_client import wire
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [
    p
    for root in (ROOT / "pipellm_daemon", ROOT / "client" / "pipellm_client")
    for p in sorted(root.rglob("*.py"))
    if "_gen" not in p.parts and p != ROOT / "client" / "pipellm_client" / "wire.py"
]


def _respelled(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.relative_to(ROOT)} line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            s = node.value
            if wire.TICKET_KEY in s or wire.DEFAULT_SOCKET in s or s == wire.DATA_SUFFIX:
                out.append(f"{where}: {s[:60]!r}")
        elif isinstance(node, ast.Attribute) and node.attr in {"SCM_RIGHTS", "CMSG_SPACE", "CMSG_LEN"}:
            out.append(f"{where}: socket.{node.attr} (use wire.scm_rights / received_fds / ancillary_space)")
        elif isinstance(node, ast.Dict):
            pairs = zip(node.keys, node.values, strict=True)
            if any(
                isinstance(k, ast.Constant) and isinstance(v, ast.Attribute) and v.attr.startswith("MODE_")
                for k, v in pairs
            ):
                out.append(f"{where}: a mode table (use wire.mode_value)")
    return out


def test_protocol_facts_are_spelled_only_in_wire() -> None:
    assert SOURCES, "no sources found"
    assert [line for p in SOURCES for line in _respelled(p)] == []


def test_every_config_mode_is_a_proto_mode_and_back() -> None:
    values = {wire.mode_value(name) for name in wire.MODE_NAMES}
    assert values == set(pb.Mode.values()) - {pb.MODE_UNSPECIFIED}
    with pytest.raises(ValueError, match="unknown mode"):
        wire.mode_value("unspecified")


def test_descriptors_round_trip_through_scm_rights() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    try:
        a.sendmsg([b"x"], wire.scm_rights([r, w]))
        _msg, anc, _flags, _addr = b.recvmsg(16, wire.ancillary_space(4))
        got = wire.received_fds(anc)
        assert len(got) == 2 and all(
            os.path.samestat(os.fstat(g), os.fstat(f)) for g, f in zip(got, (r, w), strict=True)
        )
        for fd in got:
            os.close(fd)
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
