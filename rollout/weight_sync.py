"""Full-weight sync from the learner to the rollout workers, streamed in buckets through the Ray object store.

A sync is neither one message holding the whole state dict nor one RPC per tensor: the learner walks its (merged)
tensors in order, packs consecutive ones into flat byte buffers of about `bucket_bytes` each (`bucketize`,
`pack_bucket`) and `ray.put`s each buffer as soon as it is full, so besides its model it holds one bucket at a time.
Each worker then fetches the buckets one by one, and loads each as a partial state dict in plain HF names
(`unpack_bucket` gives views into the object store's shared memory, so the worker holds no extra copy either);
that is the `InferenceEngine.load_weights` interface, which both engines implement.

Memory, stated: during a sync the object store holds one copy of the synced tensors (freed when the driver drops
the refs at the end); the learner holds its model plus one bucket; each worker its model plus nothing.

Every wait is bounded (`sync_weights(timeout_s=...)`): a dead or hung worker, or a learner that does not produce
its buckets, raises `WeightSyncError` naming what did not finish and after how long, never hangs.
GPU transports (NCCL broadcast, CUDA IPC) reuse the same buckets: `rollout/gpu_sync.py`.
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import ray
import torch

TRANSPORTS = ("object_store", "nccl", "cuda_ipc")
ALIGN = 64
"""byte alignment of every tensor inside a bucket (any dtype can be viewed at such an offset)"""


class WeightSyncError(RuntimeError):
    """A weight sync failed or could not finish in time; the message names the part and the seconds waited."""


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


# --------------------------------------------------------------------------------- object store: both ends


def put_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[ray.ObjectRef]:
    """Learner side: pack and `ray.put` one bucket at a time; returns one ref per bucket, in order.

    Each object is `(specs, buffer)`. Call it inside the learner actor: the refs it returns are owned there.
    """
    refs = []
    for bucket in bucketize(named_tensors, bucket_bytes):
        refs.append(ray.put(pack_bucket(bucket)))
        del bucket  # drop this bucket's tensors (LoRA merges) before packing the next
    return refs


def load_buckets(engine, refs: Sequence[ray.ObjectRef], timeout_s: float) -> dict[str, float]:
    """Worker side: fetch each bucket from the object store and load it into `engine` (`load_weights`), in order.

    Returns {"buckets", "bytes", "seconds"}. Raises WeightSyncError when a fetch does not finish within what is left
    of `timeout_s` (counted from the first fetch).
    """
    start = time.perf_counter()
    total = 0
    for i, ref in enumerate(refs):
        left = timeout_s - (time.perf_counter() - start)
        try:
            specs, buffer = ray.get(ref, timeout=max(left, 0.0))
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(
                f"weight sync: fetching bucket {i + 1}/{len(refs)} from the object store did not finish within "
                f"{timeout_s:g} s (rollout.sync_timeout_s)"
            ) from None
        engine.load_weights(unpack_bucket(specs, buffer))
        total += buffer.nbytes
        del specs, buffer  # release the object store mapping before the next fetch
    return {"buckets": float(len(refs)), "bytes": float(total), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------------- the two ends, as mixins


class WeightSender:
    """The learner's side of every transport (mixed into `learner.learner.LearnerImpl`; needs `self.model`)."""

    def sync_tensors(self, only_changed: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """What a sync sends: plain-named tensors, LoRA merged (only the adapted layers with `only_changed`)."""
        from posttrain.models.lora import iter_merged_tensors

        return skip_tied(iter_merged_tensors(self.model, only_lora_targets=only_changed))

    def put_weight_buckets(self, bucket_bytes: int, only_changed: bool = True) -> list[ray.ObjectRef]:
        """Object store: pack and `ray.put` the buckets one at a time (no full copy held here); their refs, in order."""
        return put_buckets(self.sync_tensors(only_changed), bucket_bytes)

    def weight_group_address(self) -> tuple[str, int]:
        """Collective transports: (this node's IP, a free port) for the group's rendezvous store, hosted here."""
        from posttrain.rollout.gpu_sync import free_address

        return free_address()

    def join_weight_group(self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float) -> None:
        """Collective transports: become rank 0 of the broadcast group (the workers are ranks 1..world_size-1)."""
        from posttrain.rollout.gpu_sync import BroadcastGroup

        self._weight_group = BroadcastGroup(address, 0, world_size, backend, timeout_s)

    def broadcast_weights(self, bucket_bytes: int, only_changed: bool = True) -> dict[str, float]:
        """Collective transports: broadcast every bucket to the group (see `gpu_sync.BroadcastGroup.send`)."""
        return self._weight_group.send(self.sync_tensors(only_changed), bucket_bytes)

    def next_ipc_bucket(self, bucket_bytes: int, only_changed: bool = True, restart: bool = False):
        """CUDA IPC: the next bucket packed on this GPU as (specs, IPC handle), or None after the last one. The buffer
        stays alive until the next call, so the workers must have loaded it by then (the driver waits for them)."""
        from posttrain.rollout.gpu_sync import IpcSender

        if restart or getattr(self, "_ipc_sender", None) is None:
            self._ipc_sender = IpcSender(self.sync_tensors(only_changed), bucket_bytes)
        item = self._ipc_sender.next()
        if item is None:
            self._ipc_sender = None
        return item


class WeightReceiver:
    """A rollout worker's side of every transport (mixed into `RolloutWorkerImpl`; needs `self.engine`)."""

    def load_weight_buckets(self, refs: Sequence[ray.ObjectRef], timeout_s: float) -> dict[str, float]:
        """Object store: fetch the buckets and load them one at a time; {"buckets", "bytes", "seconds"}."""
        return load_buckets(self.engine, refs, timeout_s)

    def join_weight_group(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Collective transports: become `rank` (>= 1) of the learner's broadcast group."""
        from posttrain.rollout.gpu_sync import BroadcastGroup

        self._weight_group = BroadcastGroup(address, rank, world_size, backend, timeout_s)

    def receive_weights(self) -> dict[str, float]:
        """Collective transports: receive and load buckets until the learner's end marker."""
        return self._weight_group.receive(self.engine)

    def load_ipc_bucket(self, specs: Sequence[TensorSpec], handle) -> dict[str, float]:
        """CUDA IPC: load one bucket straight from the learner's GPU memory."""
        from posttrain.rollout.gpu_sync import load_ipc_bucket

        return load_ipc_bucket(self.engine, specs, handle)


# --------------------------------------------------------------------------------- driver


def wait_all(refs: Sequence[ray.ObjectRef], names: Sequence[str], deadline: float, timeout_s: float, what: str) -> list:
    """`ray.get` of every ref by `deadline` (a `time.monotonic()` value ending a `timeout_s` budget); on a timeout or
    a dead actor raise WeightSyncError naming the parts (`names[i]` for `refs[i]`) that did not finish."""
    _, pending = ray.wait(list(refs), num_returns=len(refs), timeout=max(deadline - time.monotonic(), 0.0))
    if pending:
        late = [name for name, ref in zip(names, refs, strict=True) if ref in set(pending)]
        raise WeightSyncError(
            f"weight sync: {what} did not finish within the sync's {timeout_s:g} s (rollout.sync_timeout_s): "
            f"{', '.join(late)} still running"
        )
    results = []
    for name, ref in zip(names, refs, strict=True):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayActorError as err:
            raise WeightSyncError(f"weight sync: {name} died during {what} ({type(err).__name__})") from err
    return results


class WeightSync:
    """Driver side: one call streams the learner's weights into every worker over the configured transport.

    Args:
        learner: an actor with `WeightSender`'s methods (the learner, or learner rank 0 of a group).
        workers: actors with `WeightReceiver`'s methods.
        transport: "object_store", "nccl" or "cuda_ipc" (`rollout.sync_transport`).
        bucket_mb: bucket size in MiB (`rollout.sync_bucket_mb`).
        timeout_s: bound on one whole sync (`rollout.sync_timeout_s`); also the collective group's timeout.
        backend: the collective library for "nccl" ("gloo" runs the same protocol on CPU, for tests).
    """

    def __init__(
        self, learner, workers: Sequence, transport: str, bucket_mb: float, timeout_s: float, backend: str = "nccl"
    ):
        if transport not in TRANSPORTS:
            raise ValueError(f"rollout.sync_transport: unknown {transport!r}; allowed: {', '.join(TRANSPORTS)}")
        self.learner, self.workers, self.transport = learner, list(workers), transport
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.timeout_s, self.backend = timeout_s, backend
        self.names = [f"rollout worker {i}" for i in range(len(self.workers))]
        self._group_ready = False

    def __call__(self, only_changed: bool = True) -> dict[str, float]:
        """Sync once; returns `time/sync` and `sync/*` metrics. Raises WeightSyncError past the timeout."""
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        if self.transport == "object_store":
            metrics = self._object_store(deadline, only_changed)
        elif self.transport == "nccl":
            metrics = self._broadcast(deadline, only_changed)
        else:
            metrics = self._cuda_ipc(deadline, only_changed)
        metrics["time/sync"] = time.perf_counter() - start
        return metrics

    def _wait(self, refs: Sequence[ray.ObjectRef], names: Sequence[str], deadline: float, what: str) -> list:
        return wait_all(refs, names, deadline, self.timeout_s, what)

    def _object_store(self, deadline: float, only_changed: bool) -> dict[str, float]:
        put = self.learner.put_weight_buckets.remote(self.bucket_bytes, only_changed)
        (refs,) = self._wait([put], ["the learner"], deadline, "packing the weight buckets")
        # the refs travel inside a list, so Ray passes them unresolved and each worker fetches the buckets itself
        left = max(deadline - time.monotonic(), 0.0)
        calls = [w.load_weight_buckets.remote(refs, left) for w in self.workers]
        stats = self._wait(calls, self.names, deadline, f"loading {len(refs)} weight buckets")
        del refs  # the driver's last reference: the object store frees the buckets
        return {"sync/buckets": stats[0]["buckets"], "sync/megabytes": stats[0]["bytes"] / 2**20}

    def _broadcast(self, deadline: float, only_changed: bool) -> dict[str, float]:
        if not self._group_ready:
            (address,) = self._wait(
                [self.learner.weight_group_address.remote()], ["the learner"], deadline, "rendezvous"
            )
            world = len(self.workers) + 1
            calls = [self.learner.join_weight_group.remote(address, world, self.backend, self.timeout_s)]
            calls += [
                w.join_weight_group.remote(address, rank, world, self.backend, self.timeout_s)
                for rank, w in enumerate(self.workers, start=1)
            ]
            self._wait(calls, ["the learner", *self.names], deadline, "joining the weight broadcast group")
            self._group_ready = True
        calls = [self.learner.broadcast_weights.remote(self.bucket_bytes, only_changed)]
        calls += [w.receive_weights.remote() for w in self.workers]
        sent, *_ = self._wait(calls, ["the learner", *self.names], deadline, "the weight broadcast")
        return {"sync/buckets": sent["buckets"], "sync/megabytes": sent["bytes"] / 2**20}

    def _cuda_ipc(self, deadline: float, only_changed: bool) -> dict[str, float]:
        buckets = total = 0
        while True:
            call = self.learner.next_ipc_bucket.remote(self.bucket_bytes, only_changed, buckets == 0)
            (item,) = self._wait([call], ["the learner"], deadline, "packing a CUDA IPC bucket")
            if item is None:
                return {"sync/buckets": float(buckets), "sync/megabytes": total / 2**20}
            specs, handle = item
            calls = [w.load_ipc_bucket.remote(specs, handle) for w in self.workers]
            self._wait(calls, self.names, deadline, f"loading CUDA IPC bucket {buckets + 1}")
            buckets += 1
            total += sum(spec.nbytes for spec in specs)
