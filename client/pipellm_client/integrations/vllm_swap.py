"""vLLM-style KV-cache swapping through PipeLLM: the CPU side of the paged KV cache lives in a PipeLLM region.

Two shapes of vLLM are covered, with the same copy semantics as vLLM's `swap_blocks` (whole blocks, one copy
per block per layer, K and V separately):

* V0 preemption by swapping (`vllm/worker/cache_engine.py`): `swap_blocks(src, dst, block_mapping)` for one
  layer, or `CacheEngine.swap_out` / `swap_in` for all layers. Swap-out is a D2H of each block (the endpoint
  encrypts, the daemon decrypts into the region asynchronously and pre-encrypts it for its swap-in, with the
  request id as the group: vLLM preempts the newest request first and swaps in first-come-first-served, so
  open the session with `swap_order="lifo"`). Swap-in is an H2D commit from the region into the device cache.
* the older V1 worker API (`OffloadingHandler.transfer_async(job_id, (src_spec, dst_spec))`, `get_finished()`,
  `wait(job_ids)`): `OffloadingHandlers`, one FIFO handler per direction, a thin shape over
  `integrations.vllm.PipeLLMKVWorker` (the worker behind `PipeLLMOffloadingSpec`, which is what vLLM >= 0.32
  loads: use that with a real vLLM). Loads are declared as intents when submitted.

Layouts follow vLLM's paged KV cache: a device cache is one tensor per layer shaped
`(2, num_blocks, block_size, num_kv_heads, head_size)`, K at index 0 and V at 1; the V0 CPU cache has the
same shape per layer, laid out layer-major in one mutable region (V1: see `PipeLLMKVWorker`). The "device"
is a CPU tensor here: the CPU endpoint stands in for the GPU's copy engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InvalidArgument, PipeLLMError
from ._packing import raw_bytes
from .vllm import PipeLLMKVWorker

if TYPE_CHECKING:
    import torch

    from .._core import Landing
    from ..client import Session

# Transfers per H2D commit: one commit is one round trip; pieces about as deep as the daemon's prediction
# window (max_depth) measured fastest for swap-ins (16: 22.5 ms, 64: 31 ms, all 256 in one: 25-31 ms).
COMMIT_BATCH = 16


def _pairs(block_mapping: Any) -> list[tuple[int, int]]:
    """(src, dst) block pairs from a (n, 2) tensor/array or a sequence of pairs."""
    arr = np.asarray(block_mapping.cpu() if hasattr(block_mapping, "cpu") else block_mapping, dtype=np.int64)
    if arr.size == 0:
        return []
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InvalidArgument(f"block_mapping must be (n, 2) pairs of (src, dst) blocks, got shape {arr.shape}")
    return [(int(s), int(d)) for s, d in arr]


def _groups(group: int | Sequence[int] | None, n: int) -> list[int]:
    if group is None:
        return [0] * n
    if isinstance(group, int):
        return [group] * n
    gs = [int(g) for g in group]
    if len(gs) != n:
        raise InvalidArgument(f"{len(gs)} groups for {n} block pairs")
    return gs


class CpuKVCache:
    """The CPU half of a paged KV cache, all layers in one PipeLLM mutable region.

    Block (layer, kv, b) sits at `offset(layer, kv, b)`; each block is `block_bytes` long, `stride` apart.
    With `pad_to_granule`, the stride is rounded up to the daemon's write-generation granule so that a swap-out
    landing next to a block never invalidates that block's pre-encrypted ciphertext (costs memory when blocks
    are smaller than the granule; alternatively lower the daemon's `generation_granule`).
    """

    def __init__(
        self,
        session: Session,
        num_layers: int,
        num_blocks: int,
        block_shape: Sequence[int],
        dtype: torch.dtype,
        *,
        pad_to_granule: bool = False,
        name: str = "kv-cpu",
    ) -> None:
        import torch

        if num_layers <= 0 or num_blocks <= 0:
            raise InvalidArgument("need num_layers > 0 and num_blocks > 0")
        self.session = session
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_shape = tuple(int(x) for x in block_shape)
        self.dtype = dtype
        self.block_bytes: int = math.prod(self.block_shape) * int(torch.empty((), dtype=dtype).element_size())
        granule = session.generation_granule
        self.stride = -(-self.block_bytes // granule) * granule if pad_to_granule else self.block_bytes
        self.region = session.alloc_region(num_layers * 2 * num_blocks * self.stride, name=name)
        self.region.prefault()  # vLLM pins its CPU swap space at start-up: resident before the first swap-out

    def offset(self, layer: int, kv: int, block: int) -> int:
        if not (0 <= layer < self.num_layers and kv in (0, 1) and 0 <= block < self.num_blocks):
            raise InvalidArgument(f"no CPU block (layer={layer}, kv={kv}, block={block})")
        return ((layer * 2 + kv) * self.num_blocks + block) * self.stride

    def layer(self, index: int) -> CpuKVLayer:
        if not 0 <= index < self.num_layers:
            raise InvalidArgument(f"layer {index} out of range")
        return CpuKVLayer(self, index)

    def read_block(self, layer: int, kv: int, block: int) -> torch.Tensor:
        """A copy of one block as a tensor, after any swap-out landing in it is decrypted."""
        import torch

        raw = self.region.read(self.offset(layer, kv, block), self.block_bytes)
        return torch.from_numpy(raw.copy()).view(self.dtype).view(self.block_shape)

    def check_device(self, cache: torch.Tensor) -> None:
        want = (2, None, *self.block_shape)
        if cache.dim() != len(want) or cache.shape[0] != 2 or tuple(cache.shape[2:]) != self.block_shape:
            raise InvalidArgument(f"device cache shape {tuple(cache.shape)} is not (2, blocks, {self.block_shape})")
        if cache.dtype != self.dtype:
            raise InvalidArgument(f"device cache dtype {cache.dtype} differs from the CPU cache's {self.dtype}")
        if not cache.is_contiguous() or cache.device.type != "cpu":
            raise InvalidArgument("the device cache must be a contiguous CPU tensor (the CPU endpoint's device)")

    def close(self) -> None:
        if not self.session.closed:
            self.session.unregister(self.region)


@dataclass(frozen=True)
class CpuKVLayer:
    """One layer of a `CpuKVCache`: what vLLM's per-layer `swap_blocks` takes as its CPU side."""

    cache: CpuKVCache
    index: int


# -- the copies ---------------------------------------------------------------------------------------
def _swap_out(
    session: Session,
    layers: Iterable[tuple[torch.Tensor, CpuKVLayer]],
    pairs: list[tuple[int, int]],
    groups: list[int],
    ordered: bool,
) -> list[Landing]:
    """D2H each block (per layer: K of every pair, then V), marked as a swap-out; returns the landings.

    `ordered` waits for each block to land before sending the next. pipellmd records a swap-out when its
    decryption completes, so blocks decrypted concurrently would be predicted back in completion order,
    not in swap-out order, and their swap-ins would skip instead of hit.
    """
    landings: list[Landing] = []
    for dev, cpu in layers:
        cpu.cache.check_device(dev)
        for kv in (0, 1):
            for (src, dst), g in zip(pairs, groups, strict=True):
                off = cpu.cache.offset(cpu.index, kv, dst)
                region = cpu.cache.region
                landings += session.d2h(raw_bytes(dev[kv, src]), region, off, swap_out=True, group=g, wait=ordered)
    return landings


def _swap_in(
    session: Session, layers: Iterable[tuple[CpuKVLayer, torch.Tensor]], pairs: list[tuple[int, int]], batch: int
) -> int:
    """H2D each block from the region into the device cache, in swap-out order; returns bytes moved."""
    transfers: list[tuple[Any, int, int, Any]] = []
    for cpu, dev in layers:
        c = cpu.cache
        c.check_device(dev)
        for kv in (0, 1):
            for src, dst in pairs:
                transfers.append((c.region, c.offset(cpu.index, kv, src), c.block_bytes, raw_bytes(dev[kv, dst])))
    for i in range(0, len(transfers), batch):
        session.h2d_many(transfers[i : i + batch])
    return sum(t[2] for t in transfers)


def swap_blocks(
    src_cache: torch.Tensor | CpuKVLayer,
    dst_cache: torch.Tensor | CpuKVLayer,
    block_mapping: Any,
    *,
    group: int | Sequence[int] | None = None,
    batch: int = COMMIT_BATCH,
    ordered: bool = True,
) -> None:
    """vLLM's `swap_blocks` for one layer: copy whole blocks src -> dst for each (src, dst) pair.

    Device -> CPU (`dst_cache` a `CpuKVLayer`) is a swap-out: asynchronous D2H, pre-encrypted by the daemon
    for its swap-in; `group` (the request id, one per pair or one for all) orders swap-ins under "lifo".
    CPU -> device is a swap-in: returns once the endpoint has verified and written every block.
    """
    pairs = _pairs(block_mapping)
    if not pairs:
        return
    if isinstance(dst_cache, CpuKVLayer) and not isinstance(src_cache, CpuKVLayer):
        _swap_out(dst_cache.cache.session, [(src_cache, dst_cache)], pairs, _groups(group, len(pairs)), ordered)
    elif isinstance(src_cache, CpuKVLayer) and not isinstance(dst_cache, CpuKVLayer):
        _swap_in(src_cache.cache.session, [(src_cache, dst_cache)], pairs, batch)
    else:
        raise InvalidArgument("swap_blocks needs one device tensor and one CpuKVLayer (device<->CPU only)")


class CacheEngine:
    """vLLM V0's `CacheEngine` swap half: a device cache per layer, its CPU twin in a PipeLLM region."""

    def __init__(
        self,
        session: Session,
        device_caches: Sequence[torch.Tensor],
        num_cpu_blocks: int,
        *,
        pad_to_granule: bool = False,
        batch: int = COMMIT_BATCH,
        ordered: bool = True,
    ) -> None:
        if not device_caches:
            raise InvalidArgument("need at least one layer")
        first = device_caches[0]
        self.session = session
        self.device_caches = list(device_caches)
        self.batch = batch
        self.ordered = ordered
        self.cpu = CpuKVCache(
            session, len(device_caches), num_cpu_blocks, first.shape[2:], first.dtype, pad_to_granule=pad_to_granule
        )
        for c in self.device_caches:
            self.cpu.check_device(c)

    def swap_out(self, src_to_dst: Any, *, group: int | Sequence[int] | None = None) -> None:
        """Device blocks -> CPU blocks, layer by layer (vLLM's order), each block's K then V per layer."""
        pairs = _pairs(src_to_dst)
        if pairs:
            layers = [(d, self.cpu.layer(i)) for i, d in enumerate(self.device_caches)]
            _swap_out(self.session, layers, pairs, _groups(group, len(pairs)), self.ordered)

    def swap_in(self, src_to_dst: Any) -> None:
        """CPU blocks -> device blocks, in the same layer-major K-then-V order as the swap-out."""
        pairs = _pairs(src_to_dst)
        if pairs:
            layers = [(self.cpu.layer(i), d) for i, d in enumerate(self.device_caches)]
            _swap_in(self.session, layers, pairs, self.batch)

    def close(self) -> None:
        self.cpu.close()


# -- vLLM V1 offloading, the older handler API ------------------------------------------------------
@dataclass(frozen=True)
class BlockIDs:
    """A `LoadStoreSpec` of block ids on one medium ("GPU" or "CPU"), as vLLM V1's `BlockIDsLoadStoreSpec`."""

    medium: str
    block_ids: np.ndarray[Any, np.dtype[np.int64]]

    @classmethod
    def gpu(cls, ids: Sequence[int]) -> BlockIDs:
        return cls("GPU", np.asarray(ids, dtype=np.int64))

    @classmethod
    def cpu(cls, ids: Sequence[int]) -> BlockIDs:
        return cls("CPU", np.asarray(ids, dtype=np.int64))


TransferSpec = tuple[BlockIDs, BlockIDs]


@dataclass
class TransferResult:
    """As vLLM V1's: job id, success, bytes and seconds (submit to completion) and (src, dst) media."""

    job_id: int
    success: bool
    transfer_size: int | None = None
    transfer_time: float | None = None
    transfer_type: tuple[str, str] | None = None


class OffloadingHandler:
    """One direction of the older vLLM V1 worker API (`transfer_async(job_id, (src, dst))`), over the shared
    `PipeLLMKVWorker` of its `OffloadingHandlers`: jobs finish in submission order (FIFO).

    A store's device blocks are read (gathered and encrypted by the endpoint) inside `transfer_async`; it
    finishes when the daemon has landed it. A load's chunks are declared as intents in `transfer_async` and
    moved by the next `get_finished()` / `wait()` of this handler.
    """

    def __init__(self, worker: PipeLLMKVWorker, *, gpu_to_cpu: bool) -> None:
        self.worker = worker
        self.gpu_to_cpu = gpu_to_cpu
        self.transfer_type = ("GPU", "CPU") if gpu_to_cpu else ("CPU", "GPU")

    def transfer_async(self, job_id: int, spec: TransferSpec) -> bool:
        src, dst = spec
        if (src.medium, dst.medium) != self.transfer_type:
            raise InvalidArgument(f"this handler moves {self.transfer_type}, got ({src.medium}, {dst.medium})")
        if len(src.block_ids) != len(dst.block_ids):
            raise InvalidArgument("source and destination specs name different numbers of blocks")
        if self.gpu_to_cpu:
            return self.worker.submit_store(job_id, src.block_ids, None, None, dst.block_ids)
        return self.worker.submit_load(job_id, src.block_ids, dst.block_ids, None, None)

    def get_finished(self) -> list[TransferResult]:
        """Jobs finished since the last call, in submission order."""
        done = self.worker.finished_stores() if self.gpu_to_cpu else self.worker.finished_loads()
        return [TransferResult(r.job_id, r.success, r.transfer_size, r.transfer_time, self.transfer_type) for r in done]

    def wait(self, job_ids: set[int]) -> None:
        """Block until those jobs have finished (their results still come from `get_finished`)."""
        self.worker.wait(job_ids)

    def shutdown(self) -> None:
        with contextlib.suppress(PipeLLMError):
            self.worker.wait(self.worker.pending(stores=self.gpu_to_cpu, loads=not self.gpu_to_cpu))


class OffloadingHandlers:
    """The older vLLM V1 `CpuGpuOffloadingHandlers` shape over `PipeLLMKVWorker`: device caches per layer
    `(2, num_blocks, block_size, num_kv_heads, head_size)`, a host cache of `num_cpu_blocks` in one PipeLLM
    region (each block: every layer's K and V, one contiguous chunk), a store (GPU->CPU) and a load (CPU->GPU)
    handler. Loads are declared as intents when submitted; vLLM >= 0.32 uses
    `pipellm_client.integrations.vllm.PipeLLMOffloadingSpec` instead."""

    def __init__(
        self,
        session: Session,
        device_caches: Sequence[torch.Tensor],
        num_cpu_blocks: int,
        *,
        batch: int = COMMIT_BATCH,
        declare: bool = True,
        swap_out: bool = False,
        ordered: bool = False,
    ) -> None:
        import torch

        if not device_caches:
            raise InvalidArgument("need at least one layer")
        first = device_caches[0]
        tensors = []
        for c in device_caches:
            if c.shape != first.shape or c.dtype != first.dtype or c.ndim < 3 or c.shape[0] != 2:
                raise InvalidArgument("device caches must all be (2, num_blocks, ...) tensors of one shape and dtype")
            for kv in (0, 1):
                half = c[kv]
                if not half.is_contiguous():
                    raise InvalidArgument("device caches must be contiguous")
                tensors.append(half.reshape(half.shape[0], -1).view(torch.int8))
        refs = [[(t, int(tensors[t].shape[1])) for t in range(len(tensors))]]
        self.worker = PipeLLMKVWorker(
            session, tensors, refs, 1, num_cpu_blocks, batch=batch, declare=declare, swap_out=swap_out, ordered=ordered
        )
        self.gpu_to_cpu_handler = OffloadingHandler(self.worker, gpu_to_cpu=True)
        self.cpu_to_gpu_handler = OffloadingHandler(self.worker, gpu_to_cpu=False)

    def shutdown(self) -> None:
        self.worker.shutdown()
