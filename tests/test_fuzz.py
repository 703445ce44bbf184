"""Hypothesis fuzzing of one live pipellmd: malformed gRPC requests and data-plane frames.

The oracle: every input gets a status (a gRPC status code, or an Error frame), never a hang, never a crash,
and never INTERNAL/UNKNOWN from the daemon's own code (those mean an exception nobody mapped to a status).
On the data plane a random frame may legitimately need no reply (a Release of nothing, an endpoint Error
report), so after every input a sentinel frame follows whose Error must come back: the connection is alive
and in order. After the run, the same daemon process still serves a correct transfer in both directions.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from pipellm_client import Client, shm
from pipellm_client._dataplane import FrameSocket
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client._gen.pipellm.v1 import pipellm_pb2_grpc as pb_grpc
from pipellm_client.client import Session
from pipellm_client.wire import TICKET_KEY

from pipellm_daemon.launcher import DaemonProcess

from .daemon_harness import CH, SMALL_DAEMON

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = 300
SETTINGS: dict[str, Any] = {
    **SMALL_DAEMON,
    "h2d_slots": 8,
    "d2h_slots": 4,
    "demand_slots": 2,
    "max_transfers_per_commit": 64,
    "max_intents": 1024,
}
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
REPLY_TIMEOUT_S = 20.0  # generous: the machine is shared; a hang still fails the test
C = grpc.StatusCode
SERVICE = pb.DESCRIPTOR.services_by_name["PipeLLM"]
UNARY = [m for m in SERVICE.methods if not m.server_streaming]
# What a daemon may answer to bad input. INTERNAL and UNKNOWN are findings (an unmapped exception).
REFUSALS = {
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.RESOURCE_EXHAUSTED,
    C.PERMISSION_DENIED,
    C.UNAUTHENTICATED,
    C.OUT_OF_RANGE,
    C.ALREADY_EXISTS,
    C.DATA_LOSS,
    C.ABORTED,
}
U64 = 2**64 - 1
ALWAYS = {"session_id", "version"}
FRAME: Any = pb.Frame.DESCRIPTOR


# -- strategies built from the proto descriptors --------------------------------------------------------
def _scalar(f: FieldDescriptor, hints: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    if f.name in hints:
        return hints[f.name]
    t = f.type
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.one_of(st.integers(0, 64), st.integers(0, U64), st.sampled_from([U64, 2**63, 2**32, 1 << 20]))
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1))
    if t in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    if t in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return st.integers(-(2**31), 2**31 - 1)
    if t == FieldDescriptor.TYPE_ENUM:  # proto3 enums are open: unknown numbers parse fine
        assert f.enum_type is not None
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), st.integers(-5, 2**31 - 1))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.text(max_size=80), st.text(min_size=60, max_size=70))
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=160), st.sampled_from([b"\x04" + bytes(96), b"\x04" + b"\xff" * 96]))
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    raise AssertionError(f"no strategy for {f.full_name}")


def message_of(
    desc: Descriptor, hints: dict[str, st.SearchStrategy[Any]] | None = None, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Random instances of a message: any subset of fields, random values, nested messages to depth 3."""
    hints = hints or {}
    cls = pb.__dict__.get(desc.name) or _class_of(desc)
    parts: dict[str, st.SearchStrategy[Any]] = {}
    required: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.name in ALWAYS and f.name in hints:  # names that must mostly be right to get past lookups
            required[f.name] = hints[f.name]
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            assert f.message_type is not None
            if depth >= 3 or f.message_type.GetOptions().map_entry:
                continue
            inner = message_of(f.message_type, hints, depth + 1)
            parts[f.name] = st.lists(inner, max_size=6) if _repeated(f) else inner
        else:
            scalar = _scalar(f, hints)
            parts[f.name] = st.lists(scalar, max_size=8) if _repeated(f) else scalar

    def build(values: dict[str, Any]) -> Message:
        m = cls()
        for name, v in values.items():  # several members of a oneof: the last one set wins
            fd = desc.fields_by_name[name]
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                if _repeated(fd):
                    getattr(m, name).extend(v)
                else:
                    getattr(m, name).CopyFrom(v)
            elif _repeated(fd):
                getattr(m, name).extend(v)
            else:
                setattr(m, name, v)
        return m  # type: ignore[no-any-return]

    return st.fixed_dictionaries(required, optional=parts).map(build)


def _repeated(f: FieldDescriptor) -> bool:
    return bool(f.is_repeated)


def _class_of(desc: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


def mutated(raw: bytes) -> st.SearchStrategy[bytes]:
    """A valid serialization, truncated or with a few bytes changed or inserted."""

    def apply(edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
        b = bytearray(raw)
        for kind, pos, val in edits:
            if not b:
                break
            i = pos % len(b)
            if kind == 0:
                b[i] = val
            elif kind == 1:
                b.insert(i, val)
            else:
                del b[i]
        return bytes(b[:cut] if cut is not None else b)

    edit = st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255))
    return st.builds(apply, st.lists(edit, min_size=1, max_size=4), st.none() | st.integers(0, len(raw)))


# -- the daemon, and a disposable session per example ---------------------------------------------------
@dataclass
class Env:
    d: DaemonProcess
    client: Client
    channel: grpc.Channel
    stub: pb_grpc.PipeLLMStub
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1 << 62))
    stats: dict[str, int] = field(default_factory=dict)

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def alive(self) -> None:
        assert self.d.proc is not None and self.d.proc.poll() is None, f"pipellmd died:\n{self.d.log()[-4000:]}"


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with DaemonProcess(**SETTINGS) as d:
        client = Client(d.socket)
        channel = grpc.insecure_channel("unix:" + d.socket)
        e = Env(d, client, channel, pb_grpc.PipeLLMStub(channel))
        try:
            yield e
        finally:
            print(f"fuzz outcomes: {dict(sorted(e.stats.items()))}")
            channel.close()
            client.close()
        # The run must not have tripped an exception the daemon did not map to a status.
        assert '"event": "internal_error"' not in d.log()


@contextlib.contextmanager
def victim(e: Env) -> Iterator[tuple[Session, int, int]]:
    """A fresh session with a sealed read-only region and a mutable one."""
    s = e.client.open_session("fuzz")
    try:
        ro = s.alloc_region(4 * CH, readonly=True, data=np.arange(4 * CH, dtype=np.uint32).astype(np.uint8))
        rw = s.alloc_region(4 * CH)
        yield s, ro.id, rw.id
    finally:
        s.close()


def served_correctly(e: Env) -> None:
    """The daemon still moves bytes correctly, both directions, in a brand-new session."""
    e.alive()
    with Client(e.d.socket) as c, c.open_session("after-fuzz") as s:
        data = np.random.default_rng(5).integers(0, 256, 3 * CH + 7, dtype=np.uint8)
        w = s.alloc_region(len(data), readonly=True, data=data)
        dst = np.zeros(len(data), np.uint8)
        s.h2d(w, 0, len(data), dst)
        assert (dst == data).all()
        kv = s.alloc_region(len(data))
        s.d2h(data, kv, 0, wait=True)
        assert (kv.read() == data).all()
        back = np.zeros(len(data), np.uint8)
        s.h2d(kv, 0, len(data), back)
        assert (back == data).all()
        assert c.status().healthy
    e.alive()


# -- gRPC ---------------------------------------------------------------------------------------------
def request_hints(sid: str, regions: list[int]) -> dict[str, st.SearchStrategy[Any]]:
    u64 = st.integers(0, U64)
    return {
        "session_id": st.one_of(st.just(sid), st.just(sid), st.text(max_size=20)),
        "region_id": st.one_of(st.sampled_from(regions), st.integers(0, 8), u64),
        "offset": st.one_of(st.integers(0, 4 * CH), u64),
        "length": st.one_of(st.integers(0, 4 * CH + 1), u64),
        "size": st.one_of(st.integers(0, 4 * CH), st.sampled_from([4096, 1 << 40, (1 << 40) + 1]), u64),
        "offer_id": st.one_of(st.just(1000), st.integers(0, 2000)),
    }


@st.composite
def grpc_case(draw: st.DrawFn, sid: str, regions: list[int]) -> tuple[str, str, Any]:
    """(method name, how it is sent, the request object or raw bytes)."""
    method = draw(st.sampled_from(UNARY))
    how = draw(st.sampled_from(["message", "message", "message", "raw", "mutated"]))
    if how == "raw":
        return method.name, how, draw(st.binary(max_size=300))
    req = draw(message_of(method.input_type, request_hints(sid, regions)))
    if how == "mutated":
        return method.name, how, draw(mutated(req.SerializeToString()))
    return method.name, how, req


TICKETS = st.sampled_from(["valid", "valid", "valid", "valid", "fresh", "missing", "forged", "two"])


def _metadata(kind: str, ticket: str, fresh: str) -> list[tuple[str, str]]:
    return {
        "valid": [(TICKET_KEY, ticket)],
        "fresh": [(TICKET_KEY, fresh)],  # a connection with no session yet: OpenSession gets further
        "missing": [],
        "forged": [(TICKET_KEY, "0" * 32)],
        "two": [(TICKET_KEY, "forged"), (TICKET_KEY, ticket)],
    }[kind]


def check_rpc(e: Env, name: str, how: str, req: Any, md: list[tuple[str, str]]) -> None:
    if how == "message":
        call = getattr(e.stub, name)
    else:
        call = e.channel.unary_unary(
            f"/{SERVICE.full_name}/{name}", request_serializer=None, response_deserializer=None
        )
    try:
        call(req, metadata=md, timeout=REPLY_TIMEOUT_S)
        e.count("rpc:OK")
        return
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    e.count(f"rpc:{code.name}")
    if code == C.UNKNOWN and how != "message" and "DecodeError" in details:
        return  # bytes that are not the request message: grpc refuses them before the daemon sees them
    assert code in REFUSALS, f"{name} ({how}) answered {code.name}: {details!r}; request {req!r}"


def test_fuzz_grpc_requests(env: Env) -> None:
    with victim(env) as (s0, ro0, rw0):
        regions = [ro0, rw0]
        sid0 = s0.id

        @FUZZ
        @given(case=grpc_case(sid0, regions), ticket=TICKETS, data=st.data())
        def run(case: tuple[str, str, Any], ticket: str, data: st.DataObject) -> None:
            name, how, req = case
            with victim(env) as (s, ro, rw):
                # Point the request at this example's own session and regions.
                if isinstance(req, Message):
                    if getattr(req, "session_id", None) == sid0:
                        req.session_id = s.id  # type: ignore[attr-defined]
                    if getattr(req, "region_id", 0) in (ro0, rw0):
                        req.region_id = {ro0: ro, rw0: rw}[req.region_id]  # type: ignore[attr-defined]
                fresh = FrameSocket(env.d.socket)
                try:
                    fresh_ticket = fresh.recv()[0].welcome.ticket
                    if name == "RegisterRegion" and isinstance(req, Message):
                        offer_memfd(s, req, data)
                    note(f"{name} via {how} with {ticket} ticket: {req!r}")
                    check_rpc(env, name, how, req, _metadata(ticket, s.metadata[0][1], fresh_ticket))
                finally:
                    fresh.close()
            env.alive()

        run()
        assert env.stats.get("rpc:OK", 0) and env.stats.get("rpc:INVALID_ARGUMENT", 0), env.stats
        # Two requests no strategy above makes: over the size limit, and a method that does not exist.
        md = s0.metadata
        big = env.channel.unary_unary(
            f"/{SERVICE.full_name}/DeclareIntents", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            big(b"\x0a" + b"\xff" * (9 << 20), metadata=md, timeout=REPLY_TIMEOUT_S)
        assert info.value.code() == C.RESOURCE_EXHAUSTED
        nope = env.channel.unary_unary(
            f"/{SERVICE.full_name}/Nope", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            nope(b"", metadata=md, timeout=REPLY_TIMEOUT_S)
        assert info.value.code() == C.UNIMPLEMENTED
        # Watch: a bad ticket is refused at once; a good one streams until cancelled.
        with pytest.raises(grpc.RpcError) as info:
            next(iter(env.stub.Watch(pb.WatchRequest(), metadata=[(TICKET_KEY, "x")], timeout=REPLY_TIMEOUT_S)))
        assert info.value.code() == C.PERMISSION_DENIED
    served_correctly(env)


def offer_memfd(s: Session, req: Any, data: st.DataObject) -> None:
    """RegisterRegion waits for the memfd its offer_id names; send one (of the right size or not), so that
    most examples get past the wait instead of spending OFFER_WAIT_S on it."""
    if not data.draw(st.booleans(), label="send the offer"):
        return
    expected = req.size if req.readonly else req.size + -(-req.size // s.core.granule) * 8
    size = expected if 0 < expected <= 1 << 20 and data.draw(st.booleans(), label="right size") else 4096
    mem = shm.SharedMemory.create("fuzz-offer", size)
    try:
        s.fs.send(pb.Frame(offer=pb.Offer(offer_id=req.offer_id)), fds=[mem.fd])
    finally:
        mem.close()


# -- data plane -----------------------------------------------------------------------------------------
CLIENT_BODIES = ["commit", "release", "landed", "offer", "error", "welcome", "completion", "attach", "landed_done"]


def frame_hints(regions: list[int]) -> dict[str, st.SearchStrategy[Any]]:
    small = st.integers(0, 8)
    return {
        "version": st.one_of(st.just(1), st.just(1), st.just(1), st.integers(0, 2**32 - 1)),
        "region_id": st.one_of(st.sampled_from(regions), small, st.integers(0, U64)),
        "offset": st.one_of(st.integers(0, 4 * CH), st.integers(0, U64)),
        "length": st.one_of(st.integers(0, CH + 1), st.integers(0, U64)),
        "slot": st.one_of(small, st.integers(0, 2**32 - 1)),
        "slots": small,
        "nop_cells": st.one_of(small, st.integers(0, 300)),
        "ce": st.one_of(st.integers(0, 2), st.integers(0, 2**32 - 1)),
        "flags": st.one_of(st.integers(0, 2), st.integers(0, 2**32 - 1)),
        "code": st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1)),
        "seq": st.one_of(st.integers(0, 100), st.integers(0, U64)),
    }


@st.composite
def frame_input(draw: st.DrawFn, regions: list[int]) -> tuple[str, bytes, bool]:
    """(what it is, the packet, whether a memfd rides along)."""
    kind = draw(
        st.sampled_from(["structured", "structured", "plausible", "plausible", "random", "mutated", "huge", "version"])
    )
    if kind == "plausible":
        return draw(plausible_frame(regions))
    if kind == "random":
        return kind, draw(st.binary(min_size=1, max_size=400)), draw(st.booleans())
    if kind == "huge":
        which = draw(st.sampled_from(["packet", "length"]))
        if which == "packet":  # bigger than the daemon's 64 KiB frame buffer: truncated on receipt
            return "huge-packet", (draw(st.binary(min_size=1, max_size=8)) * 70_000)[:70_000], False
        field_no = draw(st.integers(1, 10))
        claimed = draw(st.sampled_from([2**31, 2**32 - 1, 2**63, 2**64 - 1, 70_000]))
        return "huge-length", bytes([field_no << 3 | 2]) + _varint(claimed) + b"\x00" * 8, False
    frame: Any = draw(message_of(FRAME, frame_hints(regions)))
    if kind == "version":
        frame.version = draw(st.sampled_from([0, 2, 255, 2**32 - 1]))
        if not frame.WhichOneof("body"):
            frame.release.SetInParent()
        return kind, frame.SerializeToString(), False
    if not frame.WhichOneof("body"):
        getattr(frame, draw(st.sampled_from(CLIENT_BODIES))).SetInParent()
    raw = frame.SerializeToString()
    if kind == "mutated":
        # An empty SEQPACKET packet reads as end-of-stream: that is a disconnect (tested below), not input.
        return kind, draw(mutated(raw).filter(bool)), draw(st.booleans())
    return f"frame:{frame.WhichOneof('body')}", raw, frame.WhichOneof("body") == "offer" and draw(st.booleans())


@st.composite
def plausible_frame(draw: st.DrawFn, regions: list[int]) -> tuple[str, bytes, bool]:
    """Frames a real client could send, with one or two values off: they reach the deep validation paths
    and, often enough, real commits and landings."""
    body = draw(st.sampled_from(["commit", "commit", "landed", "release"]))
    frame = pb.Frame(version=1)
    if body == "commit":
        for _ in range(draw(st.integers(1, 5))):
            off = draw(st.integers(0, 4 * CH - 1))
            frame.commit.transfers.append(
                pb.Transfer(
                    region_id=draw(st.sampled_from(regions)),
                    offset=off,
                    length=draw(st.integers(1, 4 * CH - off)),
                    flags=draw(st.sampled_from([0, 0, 1])),
                )
            )
        frame.commit.seq = draw(st.integers(0, 50))
    elif body == "landed":
        n = draw(st.integers(1, 3))
        lengths = [draw(st.integers(1, CH)) for _ in range(n)]
        slots = draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
        frame.landed.CopyFrom(
            pb.Landed(
                seq=draw(st.integers(0, 50)),
                region_id=draw(st.sampled_from(regions)),
                offset=draw(st.integers(0, CH)),
                length=sum(lengths) + draw(st.sampled_from([0, 0, 0, 1])),
                messages=[
                    pb.D2HMessage(ce=draw(st.integers(0, 2)), slot=sl, length=ln)
                    for sl, ln in zip(slots, lengths, strict=True)
                ],
                swap_out=draw(st.booleans()),
                group=draw(st.integers(0, 3)),
            )
        )
    else:
        frame.release.slots.extend(draw(st.lists(st.integers(0, 9), max_size=4)))
        frame.release.nop_cells.extend(draw(st.lists(st.integers(0, 300), max_size=2)))
    return f"plausible:{body}", frame.SerializeToString(), False


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def send_raw(sock: socket.socket, packet: bytes, with_fd: bool) -> None:
    if not with_fd:
        sock.send(packet)
        return
    mem = shm.SharedMemory.create("fuzz-fd", 4096)
    try:
        sock.sendmsg([packet], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, mem.fd.to_bytes(4, sys.byteorder))])
    finally:
        mem.close()


def read_until_sentinel(e: Env, fs: FrameSocket, sentinel: int, on_frame: Callable[[pb.Frame], None]) -> pb.Error:
    """Read frames until the sentinel's Error comes back; every other frame is checked on the way."""
    fs.sock.settimeout(REPLY_TIMEOUT_S)
    try:
        while True:
            try:
                frame, fds = fs.recv()
            except TimeoutError:
                raise AssertionError(f"no reply in {REPLY_TIMEOUT_S} s: the connection hangs") from None
            for fd in fds:
                os.close(fd)
            body = frame.WhichOneof("body")
            if body == "error":
                code = frame.error.code
                if frame.error.seq == sentinel:
                    return frame.error
                e.count(f"reply:error:{_code_name(code)}")
                assert code not in (C.INTERNAL.value[0], C.UNKNOWN.value[0]), f"unmapped failure: {frame.error}"
            else:
                e.count(f"reply:{body}")
            on_frame(frame)
    finally:
        fs.sock.settimeout(None)


def _code_name(number: int) -> str:
    return next((c.name for c in C if c.value[0] == number), str(number))


def endpoint_stub(fs: FrameSocket) -> Callable[[pb.Frame], None]:
    """Answer what a real endpoint would: give back the slots of every completion, so commits can finish."""

    def on(frame: pb.Frame) -> None:
        if frame.WhichOneof("body") != "completion":
            return
        rel = pb.Release()
        for d in frame.completion.deliveries:
            if d.kind in (pb.MSG_KIND_DATA, pb.MSG_KIND_DISCARD):
                rel.slots.append(d.slot)
            elif d.kind == pb.MSG_KIND_NOP:
                rel.nop_cells.append(d.slot)
        if rel.slots or rel.nop_cells:
            with contextlib.suppress(Exception):
                fs.send(pb.Frame(release=rel))

    return on


def test_fuzz_data_plane_frames(env: Env) -> None:
    @FUZZ
    @given(count=st.integers(1, 4), with_session=st.booleans(), data=st.data())
    def run(count: int, with_session: bool, data: st.DataObject) -> None:
        if with_session:
            ctx: contextlib.AbstractContextManager[Any] = victim(env)
        else:
            ctx = contextlib.nullcontext(None)
        with ctx as v:
            if v is None:
                fs = FrameSocket(env.d.socket)
                fs.recv()  # Welcome
                regions = [1, 2]
                expected = C.FAILED_PRECONDITION  # no session on this connection
            else:
                s, ro, rw = v
                fs, regions, expected = s.fs, [ro, rw], C.INVALID_ARGUMENT
            try:
                on_frame = endpoint_stub(fs)
                for _ in range(count):
                    kind, packet, with_fd = data.draw(frame_input(regions), label="input")
                    env.count(f"in:{kind}")
                    note(f"{kind}: {packet[:200]!r} fd={with_fd}")
                    try:
                        send_raw(fs.sock, packet, with_fd)
                    except OSError as exc:  # e.g. EMSGSIZE: the kernel refused it, nothing reached the daemon
                        env.count(f"send:{type(exc).__name__}")
                        continue
                    sentinel = next(env.seq)
                    fs.send(pb.Frame(commit=pb.Commit(seq=sentinel)))  # a commit without transfers: refused
                    err = read_until_sentinel(env, fs, sentinel, on_frame)
                    assert err.code == expected.value[0], err
            finally:
                if v is None:
                    fs.close()
                else:
                    # Fuzzed commits may still be waiting for slots: leave by disconnecting, not by a
                    # CloseSession that would wait for them to drain.
                    v[0].core.dead = "fuzzed"
        env.alive()

    run()
    assert env.stats.get("reply:completion", 0), f"no fuzzed commit ever went through: {env.stats}"
    served_correctly(env)


def test_fuzz_unframed_stream_and_abrupt_disconnects(env: Env) -> None:
    """Connections that vanish mid-conversation, half-open sockets and empty packets leave the daemon whole."""
    for i in range(30):
        fs = FrameSocket(env.d.socket)
        if i % 3:
            fs.recv()
        if i % 5 == 0:
            fs.sock.send(b"")  # a zero-length packet reads like an orderly shutdown
        elif i % 5 == 1:
            fs.sock.shutdown(socket.SHUT_WR)
        else:
            fs.sock.send(os.urandom(64))
        fs.close()
    env.alive()
    with Client(env.d.socket) as c:
        assert c.status().healthy
    served_correctly(env)


# -- hostile shared memory ------------------------------------------------------------------------------
# What a client may offer as a region's memory instead of the SDK's sealed memfd. Only memfds of a fixed
# size may be accepted; as mutable regions only writable, not write-sealed ones (their seals get frozen).
HOSTILE_FDS = [
    "sealed-memfd",
    "sealed-memfd-readonly-fd",
    "unsealed-memfd",
    "shrink-only-memfd",
    "grow-only-memfd",
    "memfd-without-sealing",
    "future-write-sealed-memfd",
    "pipe",
    "socket",
    "dev-zero",
    "regular-file",
    "tmpfs-file",
]
LATER = ["truncate", "grow", "future-write", "write-seal", "seal-region", "commit"]


def hostile_fd(kind: str, size: int, tmp: str) -> int:
    """A fresh fd of the given kind, `size` bytes where it has a size."""
    if kind == "pipe":
        r, wr = os.pipe()
        os.close(wr)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "dev-zero":
        return os.open("/dev/zero", os.O_RDWR)
    if kind in ("regular-file", "tmpfs-file"):
        base = "/dev/shm" if kind == "tmpfs-file" and os.path.isdir("/dev/shm") else tmp
        path = os.path.join(base, f"pipellm-fuzz-{os.getpid()}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.unlink(path)
        os.ftruncate(fd, size)
        return fd
    flags = os.MFD_CLOEXEC | (0 if kind == "memfd-without-sealing" else os.MFD_ALLOW_SEALING)
    fd = os.memfd_create("fuzz-hostile", flags)
    os.ftruncate(fd, size)
    seals = {
        "sealed-memfd": shm.F_SEAL_SHRINK | shm.F_SEAL_GROW,
        "sealed-memfd-readonly-fd": shm.F_SEAL_SHRINK | shm.F_SEAL_GROW,
        "shrink-only-memfd": shm.F_SEAL_SHRINK,
        "grow-only-memfd": shm.F_SEAL_GROW,
        "future-write-sealed-memfd": shm.F_SEAL_SHRINK | shm.F_SEAL_GROW | shm.F_SEAL_FUTURE_WRITE,
    }.get(kind, 0)
    if seals:
        fcntl.fcntl(fd, shm.F_ADD_SEALS, seals)
    if kind == "sealed-memfd-readonly-fd":
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(fd)
        return ro
    return fd


def _errno_of(fn: Callable[..., Any], *args: Any) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def test_fuzz_hostile_memfds(env: Env) -> None:
    """Any fd as a region's memory, then resized, sealed late and committed: refused with INVALID_ARGUMENT
    unless it is a memfd whose size can never change, and nothing done to it afterwards reaches the daemon
    (no crash, no worker restart)."""
    restarts = env.client.status().workers.restarts

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(
        kind=st.one_of(st.just("sealed-memfd"), st.sampled_from(HOSTILE_FDS)),
        readonly=st.booleans(),
        right_size=st.sampled_from([True, True, True, False]),
        later=st.lists(st.sampled_from(LATER), max_size=5),
    )
    @example("unsealed-memfd", False, True, ["truncate", "commit"])  # the attack that used to kill pipellmd
    @example("sealed-memfd", False, True, ["truncate", "grow", "future-write", "write-seal", "commit"])
    @example("sealed-memfd", True, True, ["future-write", "seal-region", "write-seal", "seal-region", "commit"])
    @example("sealed-memfd-readonly-fd", True, True, ["grow", "seal-region", "commit"])
    def run(kind: str, readonly: bool, right_size: bool, later: list[str]) -> None:
        with victim(env) as (s, _ro, _rw), tempfile.TemporaryDirectory() as tmp:
            n = 2 * CH
            expected = n if readonly else n + -(-n // s.core.granule) * 8
            fd = hostile_fd(kind, expected if right_size else expected + 4096, tmp)
            try:
                offer_id = next(s.core.offers)
                s.fs.send(pb.Frame(offer=pb.Offer(offer_id=offer_id)), fds=[fd])
                req = pb.RegisterRegionRequest(session_id=s.id, offer_id=offer_id, size=n, readonly=readonly)
                try:
                    region_id = env.stub.RegisterRegion(req, metadata=s.metadata, timeout=REPLY_TIMEOUT_S).region_id
                    code = C.OK
                except grpc.RpcError as exc:
                    code, region_id = exc.code(), 0
                    assert exc.details(), "a refusal says why"
                env.count(f"hostile:{kind}:{code.name}")
                acceptable = right_size and (
                    kind == "sealed-memfd"
                    or (readonly and kind in ("sealed-memfd-readonly-fd", "future-write-sealed-memfd"))
                )
                assert code == (C.OK if acceptable else C.INVALID_ARGUMENT), (kind, readonly, right_size, code)
                sealed = False
                for action in later:
                    if action == "truncate":
                        e = _errno_of(os.ftruncate, fd, 0)
                        assert e != 0 or not acceptable, "an accepted memfd could be truncated"
                    elif action == "grow":
                        e = _errno_of(os.ftruncate, fd, 4 * expected)
                        assert e != 0 or not acceptable, "an accepted memfd could grow"
                    elif action == "future-write":
                        e = _errno_of(fcntl.fcntl, fd, shm.F_ADD_SEALS, shm.F_SEAL_FUTURE_WRITE)
                        assert e != 0 or not acceptable or readonly, "an accepted mutable memfd took a late seal"
                    elif action == "write-seal":
                        e = _errno_of(fcntl.fcntl, fd, shm.F_ADD_SEALS, shm.F_SEAL_WRITE)
                        assert e != 0 or not acceptable or readonly, "a mapped mutable memfd was write-sealed"
                    elif action == "seal-region" and code == C.OK and readonly:
                        sreq = pb.SealRegionRequest(session_id=s.id, region_id=region_id)
                        try:
                            env.stub.SealRegion(sreq, metadata=s.metadata, timeout=REPLY_TIMEOUT_S)
                            sealed = True
                        except grpc.RpcError as exc:
                            assert exc.code() == C.FAILED_PRECONDITION, exc
                            assert not fcntl.fcntl(fd, shm.F_GET_SEALS) & shm.F_SEAL_WRITE
                    elif action == "commit" and code == C.OK:
                        commit = pb.Commit(seq=next(env.seq), transfers=[pb.Transfer(region_id=region_id, length=n)])
                        s.fs.send(pb.Frame(commit=commit))
                        sentinel = next(env.seq)
                        s.fs.send(pb.Frame(commit=pb.Commit(seq=sentinel)))
                        err = read_until_sentinel(env, s.fs, sentinel, endpoint_stub(s.fs))
                        assert err.code == C.INVALID_ARGUMENT.value[0], err
                        env.count(f"hostile-commit:{'sealed' if sealed or not readonly else 'unsealed'}")
            finally:
                os.close(fd)
                s.core.dead = "fuzzed"  # raw commits went around the SDK: leave by disconnecting
        env.alive()

    run()
    assert env.stats.get("hostile-commit:sealed", 0), f"no commit from accepted hostile memory: {env.stats}"
    assert env.client.status().workers.restarts == restarts, "hostile memory made a crypto worker die"
    served_correctly(env)
