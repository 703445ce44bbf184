"""The daemon's status, built once for `GetStatus`, `pipellmctl status` and the metrics endpoint."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pipellm_client import keymem
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.wire import mode_value

from . import __version__
from .config import Config
from .latency import Latency
from .pool import BouncePool
from .sessions import SessionManager
from .workers import WorkerPool


class Throughput:
    """Bytes moved over the last `window` seconds, sampled at each status call and by a periodic tick."""

    def __init__(self, window: float = 10.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def sample(self, total_bytes: int) -> float:
        now = time.monotonic()
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (total_bytes - b0) / (now - t0) if now > t0 else 0.0


@dataclass(eq=False)
class StatusBuilder:
    """The daemon's status, health and metrics snapshot, from the parts that hold them."""

    cfg: Config
    manager: SessionManager
    workers: WorkerPool
    pool: BouncePool
    started: float
    throughput: Throughput = field(default_factory=Throughput)

    @property
    def latency(self) -> Latency:
        return self.manager.latency

    def healthy(self) -> tuple[bool, str]:
        if self.manager.draining:
            return False, "draining"
        if self.workers.alive() < self.workers.count:
            return False, "crypto workers missing"
        return True, "ok"

    def build(self, uid: int | None = None) -> pb.Status:
        """The whole status; with a uid, only that uid's sessions are listed (the totals stay daemon-wide)."""
        totals = self.manager.totals()
        shown = self.manager.sessions.values() if uid is None else self.manager.owned_by(uid)
        sessions = [s.status() for s in shown]
        ws = self.workers.stats()
        prot = keymem.protection()
        return pb.Status(
            version=__version__,
            uptime_s=time.monotonic() - self.started,
            mode=mode_value(self.cfg.mode),
            sessions=sessions,
            pool=pb.PoolStatus(
                arena_bytes=self.pool.layout.size,
                arenas_in_use=self.pool.in_use,
                arenas_allocated=self.pool.allocated,
                max_arenas=self.pool.max_arenas,
                h2d_slots_in_use=sum(s.arena.h2d.in_use for s in self.manager.sessions.values()),
                h2d_slots_total=sum(s.arena.h2d.count for s in self.manager.sessions.values()),
            ),
            workers=pb.WorkerStatus(
                count=ws["count"],
                kind=ws["kind"],
                restarts=ws["restarts"],
                jobs=ws["jobs"],
                utilisation=ws["utilisation"],
            ),
            totals=totals.to_proto(),
            throughput_bytes_per_s=self.throughput.sample(totals.bytes_h2d + totals.bytes_d2h),
            healthy=self.healthy()[0],
            draining=self.manager.draining,
            keys_locked=prot["all_memory"] and prot["mlock"] and prot["dontdump"],
            key_protection=key_protection(prot),
            chunk_size=self.cfg.chunk_size,
        )


def key_protection(prot: dict[str, bool]) -> str:
    """What `keys_locked` rests on, said exactly (status and `pipellmctl status`)."""
    if prot["all_memory"] and prot["mlock"] and prot["dontdump"]:
        return "all memory locked (mlockall), key pages excluded from core dumps"
    held = "locked" if prot["mlock"] else "NOT locked"
    dump = "excluded from core dumps" if prot["dontdump"] else "NOT excluded from core dumps"
    return (
        f"key pages only: {held}, {dump}; OpenSSL key schedules and cipher objects are in unlocked memory "
        "(mlockall needs RLIMIT_MEMLOCK=infinity, e.g. LimitMEMLOCK=infinity, or CAP_IPC_LOCK)"
    )
