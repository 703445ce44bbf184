"""The endpoint on a CUDA GPU: the H100 copy engine's side of the channel, decrypting on the device.

Same rules as the CPU endpoint (pipellm_client.endpoint.Endpoint): message k is decrypted with the
endpoint's own counter k; the tag is checked on the GPU before the CTR pass may write the destination,
so a failed message leaves the destination untouched; NOPs and DISCARDs are verified and dropped; D2H data
is encrypted on the GPU with the endpoint's own D2H counter and copied into the host's D2H slot.

Ciphertext reaches the device from the pinned bounce arena (see pinned.py), or from the session's device
staging buffer when the daemon already copied it there ahead of the commit (speculative DMA, see
`DeviceStaging`): then a hit costs only the decrypt kernel.
"""

from __future__ import annotations

from typing import Any

from ..arena import ArenaLayout
from ..channel import RotationPolicy, Sender, StrictReceiver, _Direction
from ..crypto import TAG_LEN, Buffer
from ..endpoint import ChannelSecrets, Endpoint
from ..errors import InvalidArgument
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
        msg_bytes = _round_up(layout.chunk_size + TAG_LEN)
        with cp.cuda.Device(self.device_id):
            self.stream = cp.cuda.Stream(non_blocking=True)
            self._incoming = cp.empty(msg_bytes, dtype=cp.uint8)  # one message, copied in from the arena
            self._scratch = cp.empty(msg_bytes, dtype=cp.uint8)  # NOP / DISCARD plaintext, never kept
            self._outgoing = cp.empty(msg_bytes, dtype=cp.uint8)  # D2H ciphertext before it goes to the host
        self._ciphers: dict[tuple[str, int], CudaAesGcm] = {}
        self.pinned: PinnedHost | None = None
        self.staging: DeviceStaging | None = None

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
        self.pinned = pin_host_memory(arena.view, _round_up(self.layout.chunk_size + TAG_LEN))

    def enable_device_staging(self) -> DeviceStaging:
        self.staging = DeviceStaging(self.layout, self.device_id)
        return self.staging

    def _device_message(self, message: Buffer) -> Any:
        """The ciphertext on the device: already staged by the daemon, or copied in now."""
        n = len(message)
        staged, self.next_staged = self.next_staged, None
        if staged is not None and self.staging is not None:
            return self.staging.slot(staged, n)
        if self.pinned is None:
            raise InvalidArgument("the arena is not attached yet")
        dst = self._incoming[:n]
        self.pinned.to_device(memoryview(message), dst, self.stream)
        return dst

    def _after_callers_work(self) -> None:
        """Order our stream after whatever the caller queued on its current stream (uploads into a D2H
        source, reads of a destination): a non-blocking stream does not wait for the default stream."""
        ev = self.cp.cuda.Event(disable_timing=True)
        ev.record(self.cp.cuda.get_current_stream())
        self.stream.wait_event(ev)

    # -- the endpoint's crypto -----------------------------------------------------------------------------
    def _decrypt(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        self._after_callers_work()
        nonce = rx.advance()
        data = self._device_message(message)
        if int(out.size) != len(message) - TAG_LEN:
            raise InvalidArgument(f"destination holds {out.size} bytes, the message {len(message) - TAG_LEN}")
        result = self._cipher(rx).decrypt_into(nonce, data, out, stream=self.stream)
        if not result.ok():
            raise rx.reject()
        rx.accept(int(out.size))

    def _open(self, rx: StrictReceiver, message: Buffer, out: Any) -> None:
        self._decrypt(rx, message, out)

    def _open_to_host(self, rx: StrictReceiver, message: Buffer, n: int) -> bytes:
        out = self._scratch[:n]
        self._decrypt(rx, message, out)
        return bytes(out.get(stream=self.stream))

    def _open_discard(self, rx: StrictReceiver, message: Buffer) -> None:
        self._decrypt(rx, message, self._scratch[: len(message) - TAG_LEN])

    def _seal(self, tx: Sender, src: Any, slot: memoryview) -> tuple[int, int]:
        if self.pinned is None:
            raise InvalidArgument("the arena is not attached yet")
        n = int(src.size)
        self._after_callers_work()
        iv = tx.reserve()
        nonce = tx.take(iv, n)
        out = self._outgoing[: n + TAG_LEN]
        self._cipher(tx).encrypt_into(nonce, src, out, stream=self.stream)
        self.pinned.to_host(out, slot, self.stream)
        tx.submit(iv)
        return iv.version, iv.chan_ctr

    # -- views ---------------------------------------------------------------------------------------
    def _device_bytes(self, a: Any, what: str) -> Any:
        cp = self.cp
        arr = cp.asarray(a)  # cupy arrays, torch CUDA tensors (__cuda_array_interface__), ...
        if arr.device.id != self.device_id:
            raise InvalidArgument(f"{what} is on device {arr.device.id}, this endpoint runs on {self.device_id}")
        if not arr.flags.c_contiguous:
            raise InvalidArgument(f"{what} must be C-contiguous")
        return arr.reshape(-1).view(cp.uint8)

    def dest_view(self, dst: Any) -> Any:
        return self._device_bytes(dst, "destination")

    def source_view(self, src: Any) -> Any:
        return self._device_bytes(src, "source")

    def copy_plain(self, src: memoryview, out: Any) -> None:
        assert self.pinned is not None
        self._after_callers_work()
        self.pinned.to_device(src, out, self.stream)
        self.stream.synchronize()

    def to_host(self, src: Any) -> memoryview:
        self._after_callers_work()
        return memoryview(src.get(stream=self.stream))

    def close(self) -> None:
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None
        self._ciphers.clear()
        super().close()
