"""Key material never leaves memory: not in logs, status, metrics, files, or error messages.

The test process is the client, so it holds the same keys as the daemon (both derive them from the
handshake). It runs a workload that rotates keys in both directions, provokes every kind of refusal it
can (bad RPCs, bad frames, a tampered message), gathers everything the system writes or says, and
searches all of it for every key version and the master secret in every encoding a careless log line
would use. A positive control proves the search would find a leak.
"""

from __future__ import annotations

import base64
import json
import re
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pipellm_client import Client, PipeLLMError, keymem
from pipellm_client._core import Handshake
from pipellm_client._dataplane import FrameSocket
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.keys import KeyAgreement, channel_label, hkdf_expand, rotate_key
from pipellm_client.wire import TICKET_KEY

from pipellm_daemon.launcher import DaemonProcess

pytestmark = pytest.mark.integration

CHUNK = 64 << 10
# Usage per key = bytes/16 + messages; one 64 KiB chunk costs 4,097. Rotation is due at lower = upper/2
# (RotationPolicy.with_upper for small uppers) and happens before the next H2D chunk, or after the next
# D2H landing (16 chunks at most); the gap to `upper` must hold that plus what speculation encrypts ahead
# (ahead_bytes), or the channel dies of key exhaustion instead of rotating. Versions a grab misses (more
# than one rotation within one call) are filled in by KeyRing.extend_chain.
SETTINGS: dict[str, Any] = {
    "workers": 2,
    "pool_bytes": 256 << 20,
    "chunk_size": CHUNK,
    "ahead_bytes": 4 * CHUNK,
    "max_depth": 4,
    "key_usage_upper": 400_000,
    "metrics_address": "127.0.0.1:0",
}
HEX64 = re.compile(rb"[0-9a-fA-F]{64}")


def encodings(secret: bytes) -> dict[str, bytes]:
    """How a key could end up in text or a file: raw, hex, base64, Python repr; whole and by halves."""
    out: dict[str, bytes] = {}
    half = len(secret) // 2
    for part_name, part in (("whole", secret), ("first half", secret[:half]), ("second half", secret[half:])):
        out[f"raw {part_name}"] = part
        out[f"hex {part_name}"] = part.hex().encode()
        out[f"HEX {part_name}"] = part.hex().upper().encode()
    out["base64"] = base64.b64encode(secret)
    out["base64 unpadded"] = base64.b64encode(secret).rstrip(b"=")
    out["base64url"] = base64.urlsafe_b64encode(secret).rstrip(b"=")
    out["repr"] = repr(secret)[2:-1].encode()
    return out


def leaks(haystacks: dict[str, bytes], secrets: dict[str, bytes]) -> list[str]:
    found = []
    for sname, secret in secrets.items():
        for ename, needle in encodings(secret).items():
            for hname, hay in haystacks.items():
                if needle in hay:
                    found.append(f"{sname} ({ename}) in {hname}")
    return found


class KeyRing:
    """Every key version the endpoint (our side) holds at some point, plus what the chain implies."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.masters: list[bytes] = []

    def grab(self, session: Any) -> None:
        ep = session.core.endpoint
        for rx in ep.h2d:
            self.keys[f"{session.id} {rx.name} v{rx.epoch.version}"] = bytes(rx.epoch.key_bytes())
        for tx in ep.d2h:
            self.keys[f"{session.id} {tx.name} v{tx.epoch.version}"] = bytes(tx.epoch.key_bytes())

    def versions(self, session_id: str, label: str) -> list[int]:
        prefix = f"{session_id} {label} v"
        return sorted(int(k[len(prefix) :]) for k in self.keys if k.startswith(prefix))

    def extend_chain(self, extra: int = 2) -> None:
        """Rotation is deterministic (HKDF of SHA-256 of the key): add versions we may not have observed."""
        for name, first in list(self.keys.items()):
            sid, label, v = name.split(" ")
            if int(v[1:]) == 0:
                top = max(self.versions(sid, label))
                key = first
                for version in range(1, top + 1 + extra):
                    key = rotate_key(key, label)[0]
                    seen = self.keys.setdefault(f"{sid} {label} v{version}", key)
                    assert seen == key, f"{sid} {label} v{version}: the endpoint's key is not the derived one"

    def secrets(self) -> dict[str, bytes]:
        out = dict(self.keys)
        for i, m in enumerate(self.masters):
            out[f"master secret {i}"] = m
            out[f"mask transport key {i}"] = hkdf_expand(m, b"Lmask_transport", 32)
        return out


@pytest.fixture
def ring(monkeypatch: pytest.MonkeyPatch) -> KeyRing:
    """Capture each handshake's master secret: `Handshake.secrets` wipes it once channel keys exist."""
    kr = KeyRing()
    original = Handshake.secrets

    def capture(self: Handshake, channels: int) -> Any:
        kr.masters.append(bytes(self.master))
        return original(self, channels)

    monkeypatch.setattr(Handshake, "secrets", capture)
    return kr


@pytest.fixture
def daemon_dbg() -> Iterator[DaemonProcess]:
    """Debug logging: the most verbose the daemon gets is what must still be clean."""
    with DaemonProcess(log_level="debug", **SETTINGS) as d:
        yield d


def ctl(socket: str, *args: str) -> bytes:
    r = subprocess.run(
        [sys.executable, "-m", "pipellm_client.ctl", "--socket", socket, *args],
        check=False,
        capture_output=True,
        timeout=30,
    )
    return r.stdout + r.stderr


def metrics(daemon: DaemonProcess) -> bytes:
    line = next(x for x in daemon.log().splitlines() if '"metrics_listening"' in x)
    with urllib.request.urlopen(f"http://{json.loads(line)['address']}/metrics", timeout=10) as resp:
        return bytes(resp.read())


def workload(s: Any, ring: KeyRing) -> None:
    """H2D on both copy engines and D2H, long enough for several key rotations each."""
    ring.grab(s)
    n = 1 << 20
    data = np.random.default_rng(3).integers(0, 256, n, dtype=np.uint8)
    w = s.alloc_region(n, readonly=True, name="weights", data=data)
    dst = np.zeros(n, np.uint8)
    for _ in range(12):  # ce0 (speculative): 12 x 16 chunks x 4,097 usage -> a rotation every ~49 chunks
        s.h2d(w, 0, n, dst)
        ring.grab(s)
    assert (dst == data).all()
    small = np.zeros(200 << 10, np.uint8)
    for i in range(16):  # below small_transfer_threshold: ce1
        s.h2d(w, i * 4096, len(small), small)
        ring.grab(s)
    kv = s.alloc_region(2 * n, name="kv")
    src = np.random.default_rng(4).integers(0, 256, n, dtype=np.uint8)
    for i in range(8):  # 16 chunks = one landing each: at most one D2H rotation between grabs
        s.d2h(src, kv, (i % 2) * n, swap_out=True, wait=True)
        ring.grab(s)
    back = np.zeros(n, np.uint8)
    s.h2d(kv, 0, n, back)
    ring.grab(s)
    assert (back == src).all()


def provoke(client: Client, s: Any, socket: str) -> list[str]:
    """Refusals from every layer; their messages are part of what must stay clean."""
    msgs: list[str] = []

    def expect(fn: Any) -> None:
        try:
            fn()
        except (PipeLLMError, ValueError) as exc:
            msgs.extend([str(exc), repr(exc)])
        else:
            raise AssertionError(f"{fn} did not fail")

    w = next(iter(s.core.regions.values()))
    md = s.metadata
    expect(lambda: client.call(client._stub.SealRegion, pb.SealRegionRequest(session_id=s.id, region_id=999), md))
    expect(
        lambda: client.call(
            client._stub.DeclareIntents,
            pb.DeclareIntentsRequest(
                session_id=s.id,
                intents=[pb.Intent(region_id=w.id, offset=0, length=1 << 40, direction=pb.DIRECTION_H2D)],
            ),
            md,
        )
    )
    expect(lambda: client.call(client._stub.OpenSession, pb.OpenSessionRequest(), md))  # one per connection
    expect(lambda: client.call(client._stub.GetStatus, pb.GetStatusRequest(), [(TICKET_KEY, "0" * 32)]))
    expect(lambda: s.h2d(w, 0, w.size + 1, np.zeros(w.size + 1, np.uint8)))  # the SDK's own check
    # A key agreement whose mask transport does not authenticate (the daemon holds a master secret here).
    fs = FrameSocket(socket)
    try:
        welcome = fs.recv()[0].welcome
        bogus = pb.OpenSessionRequest(endpoint_public_key=KeyAgreement().public_bytes, sealed_masks=bytes(64))
        expect(lambda: client.call(client._stub.OpenSession, bogus, [(TICKET_KEY, welcome.ticket)]))
    finally:
        fs.close()
    # Data-plane refusals come back as Error frames.
    for raw in (
        pb.Frame(version=1, commit=pb.Commit(seq=9001, transfers=[pb.Transfer(region_id=w.id, length=1 << 40)])),
        pb.Frame(version=1, release=pb.Release(slots=[31])),
        pb.Frame(version=7, commit=pb.Commit(seq=9002)),
    ):
        s.fs.sock.send(raw.SerializeToString())
        frame, _fds = s.fs.recv()
        assert frame.WhichOneof("body") == "error", frame
        msgs.append(frame.error.message)
    s.fs.sock.send(b"\xff\x01not a frame")
    frame, _fds = s.fs.recv()
    msgs.append(frame.error.message)
    assert "malformed" in frame.error.message
    return msgs


def tamper(client: Client, ring: KeyRing) -> list[str]:
    """Flip one ciphertext bit in a bounce slot: the endpoint's tag check kills the channel."""
    s = client.open_session("tampered")
    ring.grab(s)
    n = 4 * CHUNK
    w = s.alloc_region(n, readonly=True, name="t", data=np.ones(n, np.uint8))
    core = s.core
    original = core._deliver

    def evil(d: pb.Delivery, p: Any, release: pb.Release) -> None:
        if d.kind == pb.MSG_KIND_DATA:
            core._arena_view(core.layout.h2d_slot(d.slot), 1)[0] ^= 0x01
        original(d, p, release)

    core._deliver = evil
    with pytest.raises(PipeLLMError) as info:
        s.h2d(w, 0, n, np.zeros(n, np.uint8))
    assert "tag mismatch" in str(info.value)
    return [str(info.value), repr(info.value)]


def test_no_key_material_anywhere(daemon_dbg: DaemonProcess, ring: KeyRing):
    d = daemon_dbg
    said: dict[str, bytes] = {}
    with Client(d.socket) as client:
        s = client.open_session("hygiene")
        workload(s, ring)
        # Rotations really happened, in both directions, on the speculative engine and on ce1.
        assert ring.versions(s.id, "Lce00_h2d_user")[-1] >= 2
        assert ring.versions(s.id, "Lce00_d2h_user")[-1] >= 1
        assert ring.versions(s.id, "Lce01_h2d_user")[-1] >= 1
        st = client.status()
        assert st.totals.key_rotations >= 4 and st.totals.channel_deaths == 0
        said["error messages"] = "\n".join(provoke(client, s, d.socket)).encode()
        said["tamper error"] = "\n".join(tamper(client, ring)).encode()
        st = client.status()
        assert st.totals.channel_deaths == 1
        said["status (protobuf)"] = st.SerializeToString()
        said["status (text)"] = str(st).encode()
        for args in (["status", "--json"], ["status"], ["sessions", "--json"], ["sessions"], ["health"]):
            said["pipellmctl " + " ".join(args)] = ctl(d.socket, *args)
        time.sleep(1.2)  # one metrics refresh, so the scrape shows the dead channel too
        said["metrics"] = metrics(d)
        s.close()
    assert d.stop() == 0
    said["daemon log"] = d.log().encode()
    for path in Path(d.dir).rglob("*"):
        if path.is_file():
            said[f"file {path.name}"] = path.read_bytes()

    assert b'"event": "key_rotation"' in said["daemon log"] and b"channel_dead" in said["daemon log"]
    assert b"tag mismatch" in said["pipellmctl status"]  # the dead channel's reason is shown, not its key
    ring.extend_chain()
    secrets = ring.secrets()
    assert len(ring.masters) >= 2 and len(secrets) >= 20
    # positive control: the search finds a key that is there, in each form we look for
    k = next(iter(secrets.values()))
    for form in (k.hex(), k.hex().upper(), base64.b64encode(k).decode(), repr(k)):
        assert leaks({"control": f"x{form}y".encode()}, {"k": k})
    assert leaks(said, secrets) == []
    for name, hay in said.items():
        assert not HEX64.search(hay), f"a 64-hex-digit run in {name}"


@pytest.mark.skipif(sys.platform != "linux", reason="mlock/MADV_DONTDUMP are Linux facilities here")
def test_key_pages_are_locked_and_not_dumpable():
    prot = keymem.protection()
    assert prot["dontdump"], "MADV_DONTDUMP refused: keys would land in core dumps"
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == 0:
        pytest.skip("RLIMIT_MEMLOCK is 0 here: mlock cannot succeed (systemd unit sets LimitMEMLOCK)")
    assert prot["mlock"], "mlock refused although RLIMIT_MEMLOCK > 0"


def test_daemon_reports_locked_keys(daemon: Any):
    with Client(daemon.socket) as c:
        st = c.status()
    if resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == 0:
        pytest.skip("RLIMIT_MEMLOCK is 0 here: the daemon cannot mlock")
    assert st.keys_locked


def _vm_locked_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmLck:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(sys.platform != "linux", reason="mlockall is a Linux facility here")
def test_daemon_and_workers_lock_all_their_memory(daemon: Any):
    """keys_locked means every key copy, OpenSSL's schedules included: the daemon and each worker mlockall."""
    if not keymem.may_lock_all_memory():
        pytest.skip("neither RLIMIT_MEMLOCK=infinity nor CAP_IPC_LOCK here: mlockall is not attempted")
    import psutil

    n = 64 << 20
    with Client(daemon.socket) as c, c.open_session("mlock") as s:
        w = s.alloc_region(n, readonly=True, data=np.ones(n, np.uint8))
        s.h2d(w, 0, n, np.zeros(n, np.uint8))  # the workers hold a key schedule and read all of the region
        st = c.status()
        procs = [psutil.Process(daemon.pid), *psutil.Process(daemon.pid).children()]
        locked = {p.pid: _vm_locked_kib(p.pid) for p in procs}
    assert st.keys_locked and st.key_protection.startswith("all memory locked"), st.key_protection
    workers = [p for p in procs if "pipellm_daemon.worker" in " ".join(p.cmdline())]
    assert len(workers) >= 1
    for p in procs:
        assert locked[p.pid] > 1024, (p.cmdline(), locked[p.pid])  # MBs locked (heap, libraries), not a few pages
    for p in workers:  # ... but region and arena pages are exempt: a tenant's bytes are never pinned
        assert locked[p.pid] < (n >> 10), (p.cmdline(), locked[p.pid])


_NO_MLOCKALL = r"""
import os, resource, sys
from pipellm_client import keymem
from pipellm_daemon.status import key_protection
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
os.setgid(65534); os.setuid(65534)  # no CAP_IPC_LOCK any more
assert not keymem.may_lock_all_memory()
assert keymem.lock_all_memory() is False
prot = keymem.protection()
print(prot["all_memory"], key_protection(prot))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="mlockall is a Linux facility here")
def test_a_finite_memlock_limit_is_reported_exactly():
    """Under a finite limit mlockall is not attempted (later mmaps would fail), and status says exactly that."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged uid")
    argv = [sys.executable, "-c", _NO_MLOCKALL]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False key pages only:") and "unlocked memory" in r.stdout, r.stdout


def test_key_objects_do_not_show_their_bytes():
    """repr/str of the objects holding keys (what a log line or a traceback would print)."""
    from pipellm_client.channel import KeyEpoch
    from pipellm_client.endpoint import ChannelSecrets

    key, mask = bytes(range(32)), bytes(12)
    label = channel_label(0, "h2d")
    epoch = KeyEpoch(label, 0, key, mask)
    secrets_ = ChannelSecrets(0, key, mask, key, mask)
    locked = keymem.LockedKey(key)
    for obj in (epoch, secrets_, locked):
        for text in (repr(obj), str(obj)):
            assert not leaks({"repr": text.encode()}, {"key": key}), text
    epoch.wipe()
    locked.wipe()
