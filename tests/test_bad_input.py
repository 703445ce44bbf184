"""Every RPC and data-plane message answers bad input with a precise status, and the daemon keeps serving."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from pipellm_client import Client, DaemonError
from pipellm_client._core import from_error_frame
from pipellm_client._dataplane import FrameSocket
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from pipellm_client.shm import SharedMemory
from pipellm_client.wire import TICKET_KEY

pytestmark = [pytest.mark.integration, pytest.mark.daemon_settings(max_intents=64, max_transfers_per_commit=16)]

C = grpc.StatusCode


@pytest.fixture
def env(daemon):
    """A client with an open session, a sealed and a mutable region, and raw access to stub and sockets."""
    c = Client(daemon.socket)
    s = c.open_session("victim-of-bad-input")
    ro = s.alloc_region(1 << 20, readonly=True, data=np.ones(1 << 20, np.uint8))
    rw = s.alloc_region(1 << 20)
    stub = pb_grpc.PipeLLMStub(grpc.insecure_channel("unix:" + daemon.socket))
    yield c, s, ro, rw, stub
    s.close()
    c.close()


def rpc_code(call, req, md) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call(req, metadata=md, timeout=10)
    return info.value.code()


def frame_error(fs: FrameSocket, frame: pb.Frame | bytes, fds: list[int] | None = None) -> pb.Error:
    if isinstance(frame, bytes):
        fs.sock.send(frame)
    else:
        fs.send(frame, fds)
    reply, got = fs.recv()
    for fd in got:
        os.close(fd)
    assert reply.WhichOneof("body") == "error", reply
    return reply.error


def test_rpc_bad_inputs(env) -> None:
    c, s, ro, rw, stub = env
    md = s.metadata
    sid = s.id
    fresh = FrameSocket(c.socket)
    welcome = fresh.recv()[0].welcome
    md2 = [(TICKET_KEY, welcome.ticket)]
    long = "x" * 65
    cases = [
        # (method, request, metadata, expected)
        (stub.GetStatus, pb.GetStatusRequest(), [], C.UNAUTHENTICATED),
        (stub.GetStatus, pb.GetStatusRequest(), [(TICKET_KEY, "forged")], C.PERMISSION_DENIED),
        (stub.OpenSession, pb.OpenSessionRequest(endpoint_public_key=b"short"), md2, C.INVALID_ARGUMENT),
        (stub.OpenSession, pb.OpenSessionRequest(endpoint_public_key=b"\x04" + bytes(96)), md2, C.INVALID_ARGUMENT),
        (stub.OpenSession, pb.OpenSessionRequest(channels=3), md2, C.INVALID_ARGUMENT),
        (stub.OpenSession, pb.OpenSessionRequest(client_name=long), md2, C.INVALID_ARGUMENT),
        (stub.OpenSession, pb.OpenSessionRequest(endpoint=9), md2, C.INVALID_ARGUMENT),
        (stub.OpenSession, pb.OpenSessionRequest(), md, C.FAILED_PRECONDITION),  # one session per connection
        (stub.CloseSession, pb.CloseSessionRequest(session_id="nope"), md, C.NOT_FOUND),
        (stub.RegisterRegion, pb.RegisterRegionRequest(session_id=sid, offer_id=999, size=10), md, C.NOT_FOUND),
        (stub.RegisterRegion, pb.RegisterRegionRequest(session_id=sid, size=0), md, C.INVALID_ARGUMENT),
        (stub.RegisterRegion, pb.RegisterRegionRequest(session_id=sid, size=1, name=long), md, C.INVALID_ARGUMENT),
        (stub.RegisterRegion, pb.RegisterRegionRequest(session_id=sid, size=1, kind=7), md, C.INVALID_ARGUMENT),
        (stub.RegisterRegion, pb.RegisterRegionRequest(session_id="other", size=1), md, C.NOT_FOUND),
        (stub.SealRegion, pb.SealRegionRequest(session_id=sid, region_id=rw.id), md, C.FAILED_PRECONDITION),
        (stub.SealRegion, pb.SealRegionRequest(session_id=sid, region_id=12345), md, C.NOT_FOUND),
        (stub.UnregisterRegion, pb.UnregisterRegionRequest(session_id=sid, region_id=12345), md, C.NOT_FOUND),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=sid, intents=[pb.Intent(region_id=12345, length=1, direction=pb.DIRECTION_H2D)]
            ),
            md,
            C.NOT_FOUND,
        ),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=sid,
                intents=[pb.Intent(region_id=ro.id, offset=1 << 20, length=1, direction=pb.DIRECTION_H2D)],
            ),
            md,
            C.INVALID_ARGUMENT,
        ),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=sid,
                intents=[pb.Intent(region_id=ro.id, offset=2**64 - 1, length=2, direction=pb.DIRECTION_H2D)],
            ),
            md,
            C.INVALID_ARGUMENT,
        ),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=sid, intents=[pb.Intent(region_id=ro.id, offset=0, length=0, direction=pb.DIRECTION_H2D)]
            ),
            md,
            C.INVALID_ARGUMENT,
        ),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(session_id=sid, intents=[pb.Intent(region_id=ro.id, offset=0, length=1)]),
            md,
            C.INVALID_ARGUMENT,
        ),
        (
            stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=sid,
                intents=[pb.Intent(region_id=ro.id, offset=0, length=300_000, direction=pb.DIRECTION_H2D)] * 65,
            ),
            md,
            C.RESOURCE_EXHAUSTED,
        ),
        (stub.CancelIntents, pb.CancelIntentsRequest(session_id="nope"), md, C.NOT_FOUND),
    ]
    for method, req, meta, expected in cases:
        assert rpc_code(method, req, meta) == expected, (method, req)
    fresh.close()


def test_register_region_with_wrong_memfd_size(env) -> None:
    _c, s, _ro, _rw, stub = env
    shm = SharedMemory.create("wrong", 4096)
    try:
        s.fs.send(pb.Frame(offer=pb.Offer(offer_id=777)), fds=[shm.fd])
        req = pb.RegisterRegionRequest(session_id=s.id, offer_id=777, size=8192, readonly=True)
        assert rpc_code(stub.RegisterRegion, req, s.metadata) == C.INVALID_ARGUMENT
    finally:
        shm.close()


def test_sealing_an_unsealed_memfd_is_refused(env) -> None:
    _c, s, _ro, _rw, stub = env
    region = s.alloc_region(4096, readonly=True)  # not sealed on our side
    req = pb.SealRegionRequest(session_id=s.id, region_id=region.id)
    assert rpc_code(stub.SealRegion, req, s.metadata) == C.FAILED_PRECONDITION
    with pytest.raises(DaemonError) as info:  # and a transfer from it is refused until it is sealed
        s.h2d(region, 0, 16, np.zeros(16, np.uint8))
    assert info.value.code == C.FAILED_PRECONDITION


def test_data_plane_bad_frames(env) -> None:
    c, s, ro, rw, _stub = env
    fs = s.fs
    T = pb.Transfer
    cases: list[tuple[pb.Frame | bytes, grpc.StatusCode]] = [
        (b"\xff\xff\xff garbage", C.INVALID_ARGUMENT),
        (pb.Frame(version=2, release=pb.Release()).SerializeToString(), C.FAILED_PRECONDITION),
        (pb.Frame(commit=pb.Commit(seq=90)), C.INVALID_ARGUMENT),
        (pb.Frame(commit=pb.Commit(seq=91, transfers=[T(region_id=999, length=1)])), C.NOT_FOUND),
        (
            pb.Frame(commit=pb.Commit(seq=92, transfers=[T(region_id=ro.id, offset=1 << 20, length=1)])),
            C.INVALID_ARGUMENT,
        ),
        (
            pb.Frame(commit=pb.Commit(seq=93, transfers=[T(region_id=ro.id, offset=2**64 - 8, length=16)])),
            C.INVALID_ARGUMENT,
        ),
        (pb.Frame(commit=pb.Commit(seq=94, transfers=[T(region_id=ro.id, length=0)])), C.INVALID_ARGUMENT),
        (pb.Frame(commit=pb.Commit(seq=95, transfers=[T(region_id=ro.id, length=1, flags=8)])), C.INVALID_ARGUMENT),
        (pb.Frame(commit=pb.Commit(seq=96, transfers=[T(region_id=ro.id, length=1)] * 17)), C.RESOURCE_EXHAUSTED),
        (pb.Frame(release=pb.Release(slots=[3])), C.INVALID_ARGUMENT),
        (pb.Frame(release=pb.Release(nop_cells=[1])), C.INVALID_ARGUMENT),
        (
            pb.Frame(landed=pb.Landed(seq=97, region_id=ro.id, length=16, messages=[pb.D2HMessage(slot=0, length=16)])),
            C.FAILED_PRECONDITION,
        ),
        (
            pb.Frame(
                landed=pb.Landed(seq=98, region_id=rw.id, length=16, messages=[pb.D2HMessage(slot=999, length=16)])
            ),
            C.INVALID_ARGUMENT,
        ),
        (
            pb.Frame(landed=pb.Landed(seq=99, region_id=rw.id, length=32, messages=[pb.D2HMessage(slot=0, length=16)])),
            C.INVALID_ARGUMENT,
        ),
        (
            pb.Frame(
                landed=pb.Landed(seq=100, region_id=rw.id, length=16, messages=[pb.D2HMessage(ce=5, slot=0, length=16)])
            ),
            C.INVALID_ARGUMENT,
        ),
        (
            pb.Frame(
                landed=pb.Landed(
                    seq=101,
                    region_id=rw.id,
                    length=32,
                    messages=[pb.D2HMessage(slot=1, length=16), pb.D2HMessage(slot=1, length=16)],
                )
            ),
            C.INVALID_ARGUMENT,
        ),
        (pb.Frame(landed=pb.Landed(seq=102, region_id=rw.id, length=16)), C.INVALID_ARGUMENT),
        (pb.Frame(welcome=pb.Welcome()), C.INVALID_ARGUMENT),
        (pb.Frame(), C.INVALID_ARGUMENT),
        (pb.Frame(offer=pb.Offer(offer_id=5)), C.INVALID_ARGUMENT),  # no memfd attached
    ]
    for frame, expected in cases:
        err = frame_error(fs, frame)
        got = from_error_frame(err).code
        assert got == expected, (frame, err)
        if isinstance(frame, pb.Frame) and frame.WhichOneof("body") in ("commit", "landed"):
            seq = frame.commit.seq if frame.HasField("commit") else frame.landed.seq
            assert err.seq == seq, "errors name the request they answer"
    # A frame carrying a descriptor it should not: refused, and the descriptor is closed, not leaked.
    shm = SharedMemory.create("stray", 4096)
    try:
        err = frame_error(fs, pb.Frame(release=pb.Release()), [shm.fd])
        assert from_error_frame(err).code == C.INVALID_ARGUMENT
    finally:
        shm.close()
    # A commit before any session exists on a connection.
    other = FrameSocket(c.socket)
    other.recv()
    err = frame_error(other, pb.Frame(commit=pb.Commit(seq=1, transfers=[T(region_id=ro.id, length=1)])))
    assert from_error_frame(err).code == C.FAILED_PRECONDITION
    other.close()
    # And after all that, the daemon and the session still serve.
    dst = np.zeros(1 << 20, np.uint8)
    s.h2d(ro, 0, 1 << 20, dst)
    assert (dst == 1).all()
    assert c.status().healthy
