"""The endpoint on a CUDA GPU: the H100 copy engine's side of the channel, decrypting on the device.

Same rules as the CPU endpoint (pipellm_client.endpoint.Endpoint): message k is decrypted with the
endpoint's own counter k; tags are checked on the GPU before the CTR pass may write a destination, so a
failed message leaves its destination untouched; NOPs and DISCARDs are verified and dropped; D2H data is
encrypted on the GPU with the endpoint's own D2H counter and copied into the host's D2H slot.

Batches. The kernels take many messages per launch (plan.py), and so does this endpoint: inside
``with endpoint.batch():`` the DATA and DISCARD messages of each channel are queued -- each takes its
nonce from the endpoint's counter when it is received, in order, and its ciphertext starts moving to the
device at once -- and D2H sends are queued likewise; `flush()` (and the end of the block) runs each
channel's queue as one batch: GHASH and the tag check of every message, then one CTR launch that writes
the destinations only if every tag of the batch matched. So a tag failure kills the channel and leaves
*every* destination of that batch untouched -- those of the messages before the bad one included -- and
none of them is accepted. A batch ends early, before anything that must see its effect: a NOP (whose
plaintext the endpoint must read), an IV or key rotation, a destination that a queued message also
writes (the later message wins, as one by one), the queue reaching the device buffers' capacity (one
message per H2D slot / D2H slot). Outside a `batch()` block every message is a batch of
one, decrypted before `receive` returns (the behaviour of the CPU endpoint).

Ciphertext reaches the device from the pinned bounce arena (see pinned.py), or from the session's device
staging buffer when the daemon already copied it there ahead of the commit (speculative DMA, see
`DeviceStaging`): then a hit costs only its share of the batch's kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..arena import ArenaLayout
from ..channel import RotationPolicy, Sender, StrictReceiver, _Direction
from ..crypto import TAG_LEN, Buffer
from ..endpoint import ChannelSecrets, Endpoint, HeldMessage
from ..errors import InvalidArgument, TagMismatch
from . import aesgcm_cuda
from .aesgcm_cuda import CudaAesGcm
from .pinned import PinnedHost, pin_host_memory


def _round_up(n: int, a: int = 256) -> int:
    return -(-n // a) * a


class DeviceStaging:
    """Device memory holding one ciphertext per H2D slot, exported to the daemon through CUDA IPC."""

    def __init__(self, layout: ArenaLayout, device_id: int) -> None:
        cp = aesgcm_cuda._cupy()
        self.stride = _round_up(layout.chunk_size + TAG_LEN)
        self.slots = layout.h2d_slots
        size = self.stride * self.slots
        with cp.cuda.Device(device_id):
            # Its own cudaMalloc, not a pool sub-allocation: an IPC handle names a whole allocation, and the
            # daemon must see this buffer at offset 0.
            self._mem = cp.cuda.Memory(size)
            self.buf = cp.ndarray((size,), dtype=cp.uint8, memptr=cp.cuda.MemoryPointer(self._mem, 0))
        self.device_id = device_id

    def ipc_handle(self) -> bytes:
        return bytes(aesgcm_cuda._cupy().cuda.runtime.ipcGetMemHandle(int(self.buf.data.ptr)))

    def slot(self, i: int, n: int) -> Any:
        if not 0 <= i < self.slots:
            raise InvalidArgument(f"device staging slot {i} out of range")
        return self.buf[i * self.stride : i * self.stride + n]


@dataclass
class _H2DEntry:
    nonce: bytes
    data: Any  # ciphertext || tag on the device
    out: Any  # destination (device), None: DISCARD (verify only)
    where: str  # "key vK chan C msg M", for the error
    counted: bool  # already in Endpoint.accepted (a DATA message whose receive() has returned)


@dataclass
class _H2DBatch:
    rx: StrictReceiver
    cipher: CudaAesGcm
    version: int
    entries: list[_H2DEntry] = field(default_factory=list)

    @property
    def counted(self) -> int:
        return sum(e.counted for e in self.entries)


@dataclass
class _D2HBatch:
    tx: Sender
    cipher: CudaAesGcm
    version: int
    # nonce, source, ciphertext out (device), the slot it is copied to (None: held on the device for later)
    entries: list[tuple[bytes, Any, Any, memoryview | None]] = field(default_factory=list)


_Batch = TypeVar("_Batch", _H2DBatch, _D2HBatch)


def _open_batch(
    queues: dict[int, _Batch],
    ce: int,
    capacity: int,
    version: int,
    flush: Callable[[int], None],
    new: Callable[[], _Batch],
) -> _Batch:
    """Copy engine `ce`'s open batch, or a new one when it is full or was begun under another key version (one
    batch runs under one key); the batch it replaces runs first."""
    q = queues.get(ce)
    if q is not None and (len(q.entries) >= capacity or q.version != version):
        flush(ce)
        q = None
    if q is None:
        q = queues[ce] = new()
    return q


class _HeldOnDevice(HeldMessage):
    """A D2H message's ciphertext in device memory, waiting for a bounce slot."""

    def __init__(self, endpoint: CudaEndpoint, ce: int, out: Any) -> None:
        super().__init__(int(out.size))
        self._endpoint = endpoint
        self._ce = ce
        self._out: Any = out

    def move_to(self, slot: memoryview) -> None:
        if len(slot) != self.nbytes:
            raise InvalidArgument(f"a held message of {self.nbytes} bytes needs a slot of as many, got {len(slot)}")
        self._endpoint.copy_held_out(self._ce, self._out, slot)
        self._out = None


def _overlaps_any(out: Any, entries: list[_H2DEntry]) -> bool:
    """Whether device array `out` shares a byte with the destination of a queued message."""
    if out is None or not out.size:
        return False
    a0 = int(out.data.ptr)
    a1 = a0 + int(out.nbytes)
    for e in entries:
        if e.out is not None and e.out.size:
            b0 = int(e.out.data.ptr)
            if a0 < b0 + int(e.out.nbytes) and b0 < a1:
                return True
    return False


class CudaEndpoint(Endpoint):
    kind = "cuda"

    def __init__(
        self, secrets: list[ChannelSecrets], policy: RotationPolicy, layout: ArenaLayout, device: int | None = None
    ) -> None:
        super().__init__(secrets, policy)
        cp = aesgcm_cuda._cupy()
        self.cp = cp
        self.device_id = int(cp.cuda.Device(device).id if device is not None else cp.cuda.Device().id)
        self.layout = layout
        self.msg_stride = _round_up(layout.chunk_size + TAG_LEN)
        self.h2d_capacity = layout.h2d_slots  # messages one H2D batch holds (one per H2D slot)
        self.d2h_capacity = layout.d2h_slots
        with cp.cuda.Device(self.device_id):
            self.stream = cp.cuda.Stream(non_blocking=True)
            # Ciphertexts copied in from the arena, one region per position in a batch, per channel.
            self._incoming = [cp.empty(self.msg_stride * self.h2d_capacity, dtype=cp.uint8) for _ in self.h2d]
            self._scratch = cp.empty(_round_up(TAG_LEN), dtype=cp.uint8)  # NOP plaintext, never kept
            self._outgoing = cp.empty(self.msg_stride * self.d2h_capacity, dtype=cp.uint8)  # D2H ciphertext
        self._ciphers: dict[tuple[str, int], CudaAesGcm] = {}
        self.pinned: PinnedHost | None = None
        self.staging: DeviceStaging | None = None
        self._h2d_q: dict[int, _H2DBatch] = {}
        self._d2h_q: dict[int, _D2HBatch] = {}
        self._batching = 0
        self.batches = 0  # H2D batches run (stats and tests)
        self.largest_batch = 0

    # -- keys ----------------------------------------------------------------------------------------
    def _cipher(self, ch: _Direction) -> CudaAesGcm:
        key = (ch.name, ch.epoch.version)
        c = self._ciphers.get(key)
        if c is None:
            c = CudaAesGcm(ch.epoch.key_bytes(), device=self.device_id)
            self._ciphers = {k: v for k, v in self._ciphers.items() if k[0] != ch.name or k[1] >= key[1] - 1}
            self._ciphers[key] = c
        return c

    # -- memory --------------------------------------------------------------------------------------
    def attach_arena(self, arena: Any) -> None:
        regions = max(self.h2d_capacity * len(self.h2d), self.d2h_capacity)
        self.pinned = pin_host_memory(arena.view, self.msg_stride, regions)

    def enable_device_staging(self) -> DeviceStaging:
        self.staging = DeviceStaging(self.layout, self.device_id)
        return self.staging

    def _device_message(self, message: Buffer, ce: int, position: int) -> Any:
        """The ciphertext on the device: already staged by the daemon, or copied in now (queued)."""
        n = len(message)
        staged, self.next_staged = self.next_staged, None
        if staged is not None and self.staging is not None:
            return self.staging.slot(staged, n)
        if self.pinned is None:
            raise InvalidArgument("the arena is not attached yet")
        if n > self.msg_stride:
            raise InvalidArgument(f"a message of {n} bytes does not fit a {self.msg_stride}-byte device slot")
        at = position * self.msg_stride
        dst = self._incoming[ce][at : at + n]
        self.pinned.to_device(memoryview(message), dst, self.stream, region=ce * self.h2d_capacity + position)
        return dst

    def _after_callers_work(self) -> None:
        """Order our stream after whatever the caller queued on its current stream (uploads into a D2H
        source, reads of a destination): a non-blocking stream does not wait for the default stream."""
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.cp.cuda.get_current_stream())
        self.stream.wait_event(ev)

    # -- batches -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Queue the DATA/DISCARD messages and D2H sends of the block; run them as batches at its end.

        A tag failure is raised at the end (or at the `flush` or NOP that ran the batch). If the block
        itself raises, queued work is dropped and its channels are killed: their counters have moved past
        messages that were never delivered.
        """
        self._batching += 1
        try:
            yield
        except BaseException:
            self._batching -= 1
            if not self._batching:
                self._abandon("a batch was abandoned by an error")
            raise
        self._batching -= 1
        if not self._batching:
            self.flush()

    def flush(self) -> None:
        """Run every queued batch now: each H2D channel's, then each D2H channel's."""
        for ce in list(self._h2d_q):
            self._flush_h2d(ce)
        for ce in list(self._d2h_q):
            self._flush_d2h(ce)

    def _abandon(self, reason: str) -> None:
        for q in self._h2d_q.values():
            q.rx.kill(reason)
            self.accepted -= q.counted
        for dq in self._d2h_q.values():
            dq.tx.kill(reason)
        self._h2d_q.clear()
        self._d2h_q.clear()

    def _ce(self, ch: StrictReceiver | Sender) -> int:
        for i, mine in enumerate(self.h2d if isinstance(ch, StrictReceiver) else self.d2h):
            if mine is ch:
                return i
        raise InvalidArgument(f"{ch.name} is not a channel of this endpoint")

    def _queue_h2d(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        if out is not None and int(out.size) != len(message) - TAG_LEN:
            raise InvalidArgument(f"destination holds {out.size} bytes, the message {len(message) - TAG_LEN}")
        ce = self._ce(rx)
        for other, oq in list(self._h2d_q.items()):
            if _overlaps_any(out, oq.entries):
                # A destination written twice ends the batch that wrote it first (on either channel): the later
                # message must win, as it would one by one.
                self._flush_h2d(other)
        v = rx.epoch.version
        q = _open_batch(
            self._h2d_q, ce, self.h2d_capacity, v, self._flush_h2d, lambda: _H2DBatch(rx, self._cipher(rx), v)
        )
        nonce = rx.advance()
        where = f"key v{rx.epoch.version} chan {rx.chan_ctr} msg {rx.msg_ctr}"
        data = self._device_message(message, ce, len(q.entries))
        # Endpoint.receive counts a DATA message once _open returns: in a batch, before it is verified.
        q.entries.append(_H2DEntry(nonce, data, out, where, counted=bool(self._batching) and out is not None))
        if not self._batching:
            self._flush_h2d(ce)

    def _flush_h2d(self, ce: int) -> None:
        q = self._h2d_q.pop(ce, None)
        if q is None or not q.entries:
            return
        try:
            self._after_callers_work()
            result = q.cipher.decrypt_batch_into([(e.nonce, e.data, e.out) for e in q.entries], stream=self.stream)
            oks = result.oks()  # waits: the batch's copies and kernels are done
        except BaseException as exc:  # the counter is past these messages: nothing may follow them
            q.rx.kill(f"a batch failed to run ({type(exc).__name__})")
            self.accepted -= q.counted
            raise
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(q.entries))
        if not all(oks):
            bad = oks.index(False)
            where = q.entries[bad].where
            q.rx.kill(f"tag mismatch at {where}")
            self.accepted -= q.counted  # counted when they were received, never delivered
            raise TagMismatch(
                f"channel {q.rx.name}: tag mismatch at {where} (tampered, replayed, reordered or dropped); "
                f"no destination of its batch of {len(q.entries)} was written"
            )
        for e in q.entries:
            q.rx.accept(int(e.data.size) - TAG_LEN)

    # -- the endpoint's crypto -----------------------------------------------------------------------------
    def _open(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        self._queue_h2d(rx, message, out)

    def _open_discard(self, rx: StrictReceiver, message: Buffer) -> None:
        self._queue_h2d(rx, message, None)

    def _open_to_host(self, rx: StrictReceiver, message: Buffer, n: int) -> bytes:
        """A NOP: its plaintext must be read here, so the queue before it runs first."""
        self._flush_h2d(self._ce(rx))
        out = self._scratch[:n]
        batching, self._batching = self._batching, 0
        try:
            self._queue_h2d(rx, message, out)  # a batch of one, run now
        finally:
            self._batching = batching
        return bytes(out.get(stream=self.stream))

    def rotate_iv(self, ce: int, new_chan_ctr: int) -> None:
        self._flush_h2d(ce)
        super().rotate_iv(ce, new_chan_ctr)

    def rotate_key(self, ce: int, new_version: int) -> None:
        self._flush_h2d(ce)
        super().rotate_key(ce, new_version)

    def rotate_d2h_key(self, ce: int) -> int:
        self._flush_d2h(ce)
        return super().rotate_d2h_key(ce)

    def rotate_d2h_iv(self, ce: int) -> int:
        self._flush_d2h(ce)
        return super().rotate_d2h_iv(ce)

    def _seal(self, tx: Sender, src: Any, slot: memoryview) -> tuple[int, int]:
        n = int(src.size)
        if len(slot) != n + TAG_LEN:
            raise InvalidArgument(f"a D2H message of {n} bytes needs a {n + TAG_LEN}-byte slot, got {len(slot)}")
        return self._queue_seal(tx, src, slot)[1:]

    def _hold(self, tx: Sender, src: Any) -> tuple[HeldMessage, int, int]:
        """The ciphertext stays in device memory (its own buffer) until a slot frees; then one copy out."""
        out, version, chan = self._queue_seal(tx, src, None)
        return _HeldOnDevice(self, self._ce(tx), out), version, chan

    def _queue_seal(self, tx: Sender, src: Any, slot: memoryview | None) -> tuple[Any, int, int]:
        """Queue one D2H encryption in `tx`'s batch: into the batch's staging area when it goes to `slot`
        at the flush, into a buffer of its own when it is held (`slot` None). Returns (out, version, chan)."""
        if self.pinned is None:
            raise InvalidArgument("the arena is not attached yet")
        n = int(src.size)
        if n + TAG_LEN > self.msg_stride:
            raise InvalidArgument(f"a D2H message of {n} bytes does not fit a {self.msg_stride}-byte slot")
        ce = self._ce(tx)
        v = tx.epoch.version
        q = _open_batch(
            self._d2h_q, ce, self.d2h_capacity, v, self._flush_d2h, lambda: _D2HBatch(tx, self._cipher(tx), v)
        )
        at = len(q.entries) * self.msg_stride
        out = self._outgoing[at : at + n + TAG_LEN] if slot is not None else self.cp.empty(n + TAG_LEN, self.cp.uint8)
        iv = tx.reserve()
        nonce = tx.take(iv, n)
        q.entries.append((nonce, src, out, slot))
        tx.submit(iv)
        if not self._batching:
            self._flush_d2h(ce)
        return out, iv.version, iv.chan_ctr

    def _flush_d2h(self, ce: int) -> None:
        q = self._d2h_q.pop(ce, None)
        if q is None or not q.entries:
            return
        assert self.pinned is not None
        try:
            self._after_callers_work()
            q.cipher.encrypt_batch_into([(nonce, src, out) for nonce, src, out, _ in q.entries], stream=self.stream)
            self.pinned.to_host_many([(out, slot) for _, _, out, slot in q.entries if slot is not None], self.stream)
        except BaseException as exc:  # their nonces are spent and their slots hold no ciphertext
            q.tx.kill(f"a D2H batch failed to run ({type(exc).__name__})")
            raise

    def copy_held_out(self, ce: int, out: Any, slot: memoryview) -> None:
        """A held message's ciphertext into the slot it was given (its batch runs first if still queued)."""
        assert self.pinned is not None
        self._flush_d2h(ce)
        try:
            self.pinned.to_host(out, slot, self.stream)
        except BaseException as exc:  # its nonce is spent and its slot holds no ciphertext
            self.d2h[ce].kill(f"a held D2H message could not be copied out ({type(exc).__name__})")
            raise

    # -- views ---------------------------------------------------------------------------------------
    def _device_bytes(self, a: Any, what: str) -> Any:
        """A CuPy view (never a copy) of GPU memory: a CuPy array, anything with __cuda_array_interface__
        (torch CUDA tensors), or a DLPack tensor CuPy imports in place. Host memory is refused: a copy on
        the device would receive the plaintext and the caller's buffer would not."""
        cp = self.cp
        if isinstance(a, cp.ndarray):
            arr = a
        elif hasattr(a, "__cuda_array_interface__"):
            arr = cp.asarray(a)  # zero-copy by the protocol
        elif hasattr(a, "__dlpack__") and hasattr(a, "data_ptr"):
            try:
                arr = cp.from_dlpack(a)
            except (TypeError, ValueError, BufferError, RuntimeError) as exc:
                raise InvalidArgument(
                    f"{what} is not GPU memory ({exc}); the CUDA endpoint writes GPU memory"
                ) from None
            if a.numel() and int(arr.data.ptr) != int(a.data_ptr()):
                raise InvalidArgument(f"{what} is not GPU memory (importing it made a copy)")
        else:
            raise InvalidArgument(
                f"{what} must be GPU memory (a CuPy array or a CUDA torch tensor) for the CUDA endpoint, "
                f"got {type(a).__name__}"
            )
        if arr.device.id != self.device_id:
            raise InvalidArgument(f"{what} is on device {arr.device.id}, this endpoint runs on {self.device_id}")
        if not arr.flags.c_contiguous:
            raise InvalidArgument(f"{what} must be C-contiguous")
        return arr.reshape(-1).view(cp.uint8)

    def dest_view(self, dst: Any) -> Any:
        return self._device_bytes(dst, "destination")

    def torch_empty(self, nbytes: int) -> Any:
        """A uint8 torch tensor of `nbytes` in this endpoint's device memory (allocated by CuPy, shared with
        torch through DLPack): what integrations fetch into."""
        from torch.utils.dlpack import from_dlpack

        with self.cp.cuda.Device(self.device_id):
            arr = self.cp.empty(max(nbytes, 1), dtype=self.cp.uint8)
        return from_dlpack(arr)[:nbytes]

    @property
    def torch_device(self) -> Any:
        """The torch device whose tensors this endpoint writes (cuda:N)."""
        dev = getattr(self, "_torch_device", None)
        if dev is None:
            dev = self._torch_device = self.torch_empty(16).device
        return dev

    def source_view(self, src: Any) -> Any:
        return self._device_bytes(src, "source")

    def copy_plain(self, src: memoryview, out: Any) -> None:
        assert self.pinned is not None
        self.flush()
        self._after_callers_work()
        self.pinned.to_device(src, out, self.stream)
        self.stream.synchronize()

    def to_host(self, src: Any) -> memoryview:
        self.flush()
        self._after_callers_work()
        return memoryview(src.get(stream=self.stream))

    def close(self) -> None:
        self._h2d_q.clear()
        self._d2h_q.clear()
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
        self._ciphers.clear()
        super().close()
