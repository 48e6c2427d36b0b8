"""Weight-sync buckets, pure packing (torch and numpy only, no Ray, no process groups): consecutive tensors packed
into flat byte buffers of about `bucket_bytes` each, and read back as views.

Every transport sends these buckets (`rollout/weight_sender.py` for the learner's end, `rollout/weight_sync.py` for
the workers' end and the driver, `rollout/gpu_sync.py` for NCCL and CUDA IPC); see `rollout/weight_sync.py` for the
whole protocol and its memory.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

ALIGN = 64
"""byte alignment of every tensor inside a bucket (any dtype can be viewed at such an offset)"""


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives inside a bucket's flat byte buffer."""

    name: str
    dtype: str
    """torch dtype name without the `torch.` prefix, e.g. "float32", "bfloat16\""""
    shape: tuple[int, ...]
    offset: int
    """byte offset into the bucket (a multiple of ALIGN)"""
    nbytes: int


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def bucketize(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group tensors, in order, into consecutive buckets of at most `bucket_bytes` (aligned) bytes each.

    Greedy: a tensor joins the current bucket unless that would push it past `bucket_bytes`; then the bucket is
    closed and a new one starts. A tensor larger than `bucket_bytes` on its own gets a bucket to itself (a bucket is
    never empty, a tensor never split). Lazy: the input is consumed one bucket ahead, so a generator of freshly
    computed tensors (LoRA merges) holds at most one bucket of them at once.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    used = 0
    for name, tensor in named_tensors:
        size = _aligned(tensor_nbytes(tensor))
        if bucket and used + size > bucket_bytes:
            yield bucket
            bucket, used = [], 0
        bucket.append((name, tensor))
        used += size
    if bucket:
        yield bucket


def skip_tied(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Drop a tensor that is the very same memory as one already passed on (same storage, address, dtype, shape,
    strides): tied weights, e.g. `lm_head.weight` that is `model.embed_tokens.weight` (SmolLM2, Qwen2.5-0.5B). The
    receiving model, built from the same checkpoint, ties them too, so loading one updates both; vLLM skips the tied
    head.

    An address identifies memory only while that memory is alive: a LoRA-merged (or dequantized QLoRA) copy that was
    packed and dropped frees its address for the next copy, which must not be taken for a "tie" (that once lost a
    whole layer's update, intermittently). So a tie also needs the earlier tensor's storage to be alive and to be the
    very storage of this tensor; only a weak reference to it is kept (torch keeps one Python object per live storage),
    so the copies are freed as the walk goes and a sync never holds more than its bucket."""
    seen: dict[tuple, weakref.ref] = {}
    for name, tensor in named_tensors:
        storage = tensor.untyped_storage()
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and key in seen and seen[key]() is storage:
            continue
        seen[key] = weakref.ref(storage)
        yield name, tensor


def bucket_specs(bucket: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[TensorSpec], int]:
    """Where each tensor of `bucket` goes in a flat buffer, and the buffer's size in bytes."""
    specs, offset = [], 0
    for name, tensor in bucket:
        nbytes = tensor_nbytes(tensor)
        specs.append(TensorSpec(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
        offset += _aligned(nbytes)
    return specs, offset


def pack_into(bucket: Sequence[tuple[str, torch.Tensor]], specs: Sequence[TensorSpec], flat: torch.Tensor) -> None:
    """Copy each tensor (any device, dtype, layout) into its place in the flat uint8 tensor `flat`."""
    with torch.no_grad():
        for spec, (_, tensor) in zip(specs, bucket, strict=True):
            _view(flat, spec).copy_(tensor.detach())


def pack_bucket(bucket: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[TensorSpec], np.ndarray]:
    """Copy the tensors into one flat uint8 CPU buffer; returns (specs, buffer).

    A numpy buffer (not a torch tensor) because Ray stores numpy arrays out of band: a worker's `ray.get` then maps
    the object store's memory instead of unpickling a copy.
    """
    specs, size = bucket_specs(bucket)
    buffer = np.empty(size, dtype=np.uint8)
    pack_into(bucket, specs, torch.from_numpy(buffer))
    return specs, buffer


def unpack_bucket(specs: Sequence[TensorSpec], buffer: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    """The bucket's tensors by name, as views into `buffer` (no copy; read-only when the buffer is)."""
    flat = buffer if isinstance(buffer, torch.Tensor) else _as_uint8_tensor(buffer)
    end = max((s.offset + s.nbytes for s in specs), default=0)
    if flat.numel() < end:
        raise ValueError(f"weight bucket holds {flat.numel()} bytes but its specs need {end}")
    return {spec.name: _view(flat, spec) for spec in specs}


def _view(flat_uint8: torch.Tensor, spec: TensorSpec) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    return flat_uint8[spec.offset : spec.offset + spec.nbytes].view(dtype).view(spec.shape)


def _as_uint8_tensor(buffer: np.ndarray) -> torch.Tensor:
    # Object-store arrays are read-only and torch warns that writing to them would be undefined; nothing here writes.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(buffer)
