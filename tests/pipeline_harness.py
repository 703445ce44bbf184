"""The daemon's real Pipeline wired to the SDK's real SessionCore in one process, without sockets.

Completions go straight into the endpoint and its releases straight back, so a test can drive thousands of
commits quickly, with real worker processes doing the encryption and every byte checked.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import numpy as np
from pipellm_client import keys
from pipellm_client._core import SessionCore
from pipellm_client._gen.pipellm.v1 import pipellm_pb2 as pb
from pipellm_client.arena import ArenaLayout
from pipellm_client.channel import KeyEpoch, PredictingReceiver, RotationPolicy, Sender
from pipellm_client.endpoint import ChannelSecrets
from pipellm_client.regions import Region as ClientRegion
from pipellm_client.ring import RingView
from pipellm_client.shm import SharedMemory
from pipellm_client.wire import generation_table_bytes

from pipellm_daemon.config import Config
from pipellm_daemon.events import EventBus
from pipellm_daemon.pipeline import Pipeline
from pipellm_daemon.pool import Arena
from pipellm_daemon.predictors import ChunkId
from pipellm_daemon.regions import Region as DaemonRegion
from pipellm_daemon.sessions import DeliveryRing
from pipellm_daemon.streams import D2HStream, H2DStream
from pipellm_daemon.workers import WorkerPool


class PipelinePair:
    """One session: daemon-side pipeline + client-side endpoint, sharing memfds like the real thing."""

    _ids = 0

    def __init__(
        self,
        cfg: Config,
        workers: WorkerPool,
        policy: RotationPolicy | None = None,
        swap_order: str = "fifo",
        endpoint: str = "cpu",
        ring: bool = False,
    ):
        self.cfg = cfg
        self.workers = workers
        self.policy = policy or RotationPolicy()
        master = os.urandom(32)
        masks = [keys.new_mask() for _ in range(4)]
        secrets = []
        h2d, d2h = [], []
        for ce in range(cfg.channels):
            hl, dl = keys.channel_label(ce, "h2d"), keys.channel_label(ce, "d2h")
            hk, dk = keys.derive_channel_key(master, hl), keys.derive_channel_key(master, dl)
            secrets.append(ChannelSecrets(ce, hk, masks[2 * ce], dk, masks[2 * ce + 1]))
            h2d.append(H2DStream(ce, Sender(hl, KeyEpoch(hl, 0, hk, masks[2 * ce]), self.policy), workers))
            d2h.append(
                D2HStream(ce, PredictingReceiver(dl, KeyEpoch(dl, 0, dk, masks[2 * ce + 1]), self.policy), workers)
            )
        layout = ArenaLayout(cfg.chunk_size, cfg.h2d_slots, cfg.d2h_slots)
        shm = SharedMemory.create("test-arena", layout.size)
        self.arena = Arena(layout, shm, workers.new_handle())
        workers.map(self.arena.handle, shm)
        self.regions: dict[int, DaemonRegion] = {}
        self.events = EventBus()
        self.ring = DeliveryRing.create(2 * cfg.h2d_slots + 8) if ring else None
        self.pipeline = Pipeline(
            session_id="test",
            cfg=cfg,
            workers=workers,
            arena=self.arena,
            regions=self.regions,
            h2d=h2d,
            d2h=d2h,
            events=self.events,
            endpoint_bytes_per_us=cfg.endpoint_bytes_per_us,
            swap_order=swap_order,
            ring=self.ring.view if self.ring is not None else None,
        )
        resp = pb.OpenSessionResponse(
            session_id="test", mode=pb.MODE_PIPELLM, channels=cfg.channels, generation_granule=cfg.generation_granule,
            small_transfer_threshold=cfg.small_transfer_threshold,
            arena=pb.ArenaGeometry(size=layout.size, chunk_size=layout.chunk_size, h2d_slots=layout.h2d_slots,
                                   d2h_slots=layout.d2h_slots, nop_cells=layout.nop_cells,
                                   slot_stride=layout.slot_stride, nop_bytes=layout.nop_bytes),
            rotation=pb.RotationPolicy(key_usage_lower=self.policy.lower, key_usage_upper=self.policy.upper,
                                       iv_rotation_remaining=self.policy.iv_rotation_remaining),
        )  # fmt: skip
        if endpoint == "cuda":
            resp.mode = pb.MODE_PIPELLM
        self.core = SessionCore(resp, secrets, endpoint=endpoint)
        self.core.arena = SharedMemory.attach(os.dup(shm.fd), layout.size, writable=True)
        self.core.endpoint.attach_arena(self.core.arena)
        if self.ring is not None:  # the SDK side maps the same memory; its doorbell is `pipeline.doorbell()`
            self.core.ring_shm = SharedMemory.attach(os.dup(self.ring.shm.fd), self.ring.shm.size, writable=True)
            self.core.ring = RingView(self.core.ring_shm.view, self.ring.capacity)
            self.core.bell = os.dup(self.ring.bell)
        self.seq = 0

    def region(self, size: int, *, readonly: bool, data: np.ndarray[Any, Any] | None = None) -> ClientRegion:
        PipelinePair._ids += 1
        rid = PipelinePair._ids
        total = size if readonly else size + generation_table_bytes(size, self.cfg.generation_granule)
        shm = SharedMemory.create("test-region", total)
        client = ClientRegion(rid, "r", shm, size, readonly, self.cfg.generation_granule, self._wait, lambda r: None)
        if data is not None:
            client.array[: data.size] = data
        if readonly:
            client.shm.seal_readonly()
            client.sealed = True
        daemon_shm = SharedMemory.attach(os.dup(shm.fd), total, writable=not readonly)
        handle = self.workers.new_handle()
        self.workers.map(handle, daemon_shm)
        dr = DaemonRegion(rid, "r", daemon_shm, size, readonly, self.cfg.generation_granule, handle)
        if readonly:
            dr.seal()
        self.regions[rid] = dr
        self.core.regions[rid] = client
        return client

    def _wait(self, region: ClientRegion, offset: int, length: int) -> None:
        pass  # landings complete synchronously in `d2h`

    def _send(self, comp: pb.Completion) -> None:
        release = self.core.apply_completion(comp)
        if release is not None:
            self.pipeline.release(list(release.release.slots), list(release.release.nop_cells))

    async def commit(self, transfers: list[tuple[ClientRegion, int, int, np.ndarray[Any, Any], bool]]) -> None:
        frame, pending = self.core.commit_frame(transfers)
        if frame is not None:
            daemon_side = [(self.regions[t.region_id], t) for t in frame.commit.transfers]
            await self.pipeline.commit(frame.commit.seq, daemon_side, self._send)
        self.pipeline.doorbell()  # as the eventfd would wake the daemon
        assert pending.done and pending.error is None

    async def d2h(
        self, src: np.ndarray[Any, Any], region: ClientRegion, offset: int, *, swap_out: bool, group: int = 0
    ):
        gen = self.core.landed_frames(src, region, offset, swap_out=swap_out, group=group)
        for frame, _landing in gen:
            directives = await self.pipeline.landed(frame.landed, self.regions[region.id])
            self.core.landed_done(pb.LandedDone(seq=frame.landed.seq, directives=directives))

    def keys_of(self, region: ClientRegion, offset: int, length: int) -> list[ChunkId]:
        out, done = [], 0
        while done < length:
            n = min(self.cfg.chunk_size, length - done)
            out.append(ChunkId(region.id, offset + done, n))
            done += n
        return out

    def close(self) -> None:
        self.pipeline.close()
        self.core.close()
        if self.ring is not None:
            self.ring.close()


async def settle(rounds: int = 3, pipelines: list[Any] | None = None, timeout: float = 5.0) -> None:
    """Let worker completions arrive (they come back through the event loop); with `pipelines`, wait until
    none of their queued entries is still being encrypted."""
    for _ in range(rounds):
        await asyncio.sleep(0.002)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pipelines and loop.time() < deadline:
        if not any(e.state == 1 for p in pipelines for e in p.speculative.queue):  # State.ENCRYPTING
            return
        await asyncio.sleep(0.002)
