"""No silent downgrades: plaintext transfers and sampled verification need the client's explicit opt-in.

A daemon configured with `mode = plain` (by TOML, environment or flag) must not turn a tenant's traffic into
plaintext copies behind its back, and `verify=N` (decrypt one DATA message in N) is a benchmark setting
that a client has to ask for by name. Both are loud when used: status and the daemon's log say so.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from pipellm_client import Client, DaemonError, InvalidArgument, PipeLLMError
from pipellm_client._core import SessionCore, verify_every
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb

from pipellm_daemon.launcher import DaemonProcess

pytestmark = pytest.mark.integration


def _events(d: DaemonProcess, kind: str) -> int:
    return sum(f'"event": "{kind}"' in line for line in d.log().splitlines())


@pytest.mark.daemon_settings(mode="plain")
def test_plain_daemon_refuses_a_client_that_did_not_opt_in(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(DaemonError) as ei:
            c.open_session("no-opt-in")
        assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "NO ENCRYPTION" in ei.value.details and "allow_plain" in ei.value.details
        assert c.list_sessions() == []
        with c.open_session("opted-in", allow_plain=True) as s:
            w = s.alloc_region(1 << 20, readonly=True, data=np.full(1 << 20, 7, np.uint8))
            dst = np.zeros(1 << 20, np.uint8)
            s.h2d(w, 0, 1 << 20, dst)
            assert (dst == 7).all()
            st = c.status()
            assert st.mode == pb.MODE_PLAIN
    assert _events(daemon, "plaintext_session") == 1  # the opted-in session is logged as plaintext


def test_client_refuses_a_plain_response_without_opt_in() -> None:
    """Defence in depth: even a daemon that answered MODE_PLAIN is refused by the SDK itself."""
    resp = pb.OpenSessionResponse(session_id="x", mode=pb.MODE_PLAIN, channels=1)
    with pytest.raises(PipeLLMError, match="allow_plain"):
        SessionCore(resp, [])


def test_sampled_verification_needs_the_benchmark_opt_in(daemon: DaemonProcess) -> None:
    with Client(daemon.socket) as c:
        with pytest.raises(InvalidArgument, match="allow_unverified"):
            c.open_session("sampled", verify=8)
        with c.open_session("sampled", verify=8, allow_unverified=True) as s:
            (mine,) = [x for x in c.list_sessions() if x.session_id == s.id]
            assert mine.verify_every == 8
        with c.open_session("full") as s:
            (mine,) = [x for x in c.list_sessions() if x.session_id == s.id]
            assert mine.verify_every == 1
    assert _events(daemon, "sampled_verification") == 1


@pytest.mark.parametrize("bad", [0, -1, True, "some", 1.5])
def test_verify_values_are_checked(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        verify_every(bad, allow_unverified=True)  # type: ignore[arg-type]
    assert verify_every("all") == 1 and verify_every(4, allow_unverified=True) == 4
