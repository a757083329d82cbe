"""Same-GPU (prefill, decode) pairs: `pair_transport` picks a pair's KV transport, and
`SharedTensor` carries a CUDA tensor's IPC handle (and events) as int64 words over the control
links; the exporter keeps the tensor alive. The transfer itself: ipc_transfer.py."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

MAGIC = 0x1C0DA  # first word of every packed handle: a stray tensor is refused, not misread
_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32, torch.float16, torch.int64,
                                    torch.int32, torch.uint8)


class KVTransport(enum.Enum):
    GLOO = "gloo"  # CPU pairs; same-GPU pairs without IPC (through host memory)
    NCCL = "nccl"  # two different GPUs
    CUDA_IPC = "cuda_ipc"  # both ends on one GPU: one device-to-device copy


def pair_transport(prefill: torch.device, decode: torch.device, ipc: bool = True) -> KVTransport:
    """How a (prefill, decode) pair moves KV, from the two ranks' devices (dist.device_for_rank).

    Both ends of a serve world share one device type; a CPU/CUDA pair is a bug and raises."""
    if prefill.type != decode.type:
        raise ValueError(f"a KV pair spans {prefill} and {decode}: both ends use one device type")
    if prefill.type == "cpu":
        return KVTransport.GLOO
    if prefill.type != "cuda":
        raise ValueError(f"no KV transport for device type {prefill.type!r}")
    if (prefill.index or 0) != (decode.index or 0):
        return KVTransport.NCCL
    return KVTransport.CUDA_IPC if ipc else KVTransport.GLOO


def pack_bytes(b: bytes) -> list[int]:
    """Length, then one int64 word per byte (handles are 64-ish bytes: size is no concern)."""
    return [len(b), *b]


def unpack_bytes(words: list[int], at: int) -> tuple[bytes, int]:
    """Inverse of pack_bytes starting at words[at]; returns (bytes, index after them)."""
    n = words[at]
    if n < 0 or at + 1 + n > len(words):
        raise ValueError(f"packed bytes of length {n} at word {at} overrun {len(words)} words")
    return bytes(words[at + 1:at + 1 + n]), at + 1 + n


@dataclass(frozen=True)
class SharedTensor:
    """Everything a process on the same GPU needs to open a CUDA tensor of another process."""

    device: int
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # elements into the storage
    handle: bytes  # cudaIpcMemHandle of the allocation holding the storage
    storage_size_bytes: int
    storage_offset_bytes: int  # the storage's offset within that allocation
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool

    @classmethod
    def export(cls, t: torch.Tensor) -> SharedTensor:
        """Share CUDA tensor t (its whole storage is shared; t's view is recorded)."""
        if t.device.type != "cuda":
            raise ValueError(f"only CUDA tensors are shared through IPC, got one on {t.device}")
        (device, handle, size_bytes, offset_bytes, ref_handle, ref_offset, event_handle,
         event_sync) = t.untyped_storage()._share_cuda_()
        return cls(device, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), handle,
                   size_bytes, offset_bytes, ref_handle, ref_offset, event_handle, bool(event_sync))

    def open(self) -> torch.Tensor:
        """The shared tensor in this process (same GPU memory: writes are seen by both).

        Through torch's own rebuild, which caches opened allocations per process: CUDA refuses
        to open one allocation twice in a process, as two views of one buffer would."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(self.size), self.stride, self.offset, torch.UntypedStorage,
            self.dtype, self.device, self.handle, self.storage_size_bytes,
            self.storage_offset_bytes, False, self.ref_counter_handle, self.ref_counter_offset,
            self.event_handle, self.event_sync_required)

    def to_wire(self) -> torch.Tensor:
        """int64 CPU tensor [N] for a control link."""
        words = [MAGIC, self.device, _DTYPES.index(self.dtype), len(self.size), *self.size,
                 *self.stride, self.offset, self.storage_size_bytes, self.storage_offset_bytes,
                 self.ref_counter_offset, int(self.event_sync_required)]
        for b in (self.handle, self.ref_counter_handle, self.event_handle):
            words += pack_bytes(b)
        return torch.tensor(words, dtype=torch.int64)

    @classmethod
    def from_wire(cls, packed: torch.Tensor) -> SharedTensor:
        """Inverse of to_wire; refuses anything that is not a packed handle."""
        w = packed.tolist()
        if len(w) < 4 or w[0] != MAGIC:
            raise ValueError(f"not a packed CUDA IPC handle (first words {w[:4]})")
        device, dtype_code, ndim = w[1], w[2], w[3]
        if not 0 <= dtype_code < len(_DTYPES) or ndim < 0:
            raise ValueError(f"packed handle: bad dtype code {dtype_code} or rank {ndim}")
        at = 4
        size, stride = tuple(w[at:at + ndim]), tuple(w[at + ndim:at + 2 * ndim])
        at += 2 * ndim
        if len(w) < at + 5:
            raise ValueError(f"packed handle truncated at word {len(w)}")
        offset, size_bytes, offset_bytes, ref_offset, event_sync = w[at:at + 5]
        at += 5
        handle, at = unpack_bytes(w, at)
        ref_handle, at = unpack_bytes(w, at)
        event_handle, at = unpack_bytes(w, at)
        if at != len(w):
            raise ValueError(f"packed handle has {len(w) - at} words too many")
        return cls(device, _DTYPES[dtype_code], size, stride, offset, handle, size_bytes,
                   offset_bytes, ref_handle, ref_offset, event_handle, bool(event_sync))
