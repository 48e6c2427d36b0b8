"""GPU transports of the weight sync: a broadcast group from learner rank 0 to the engines, and CUDA IPC handles.

Both send the same buckets as the object store (`rollout/buckets.py`: `bucketize`, `bucket_specs`, `pack_into`)
and load them through the engine's `load_weights` (partial state dicts in plain HF names).

- Broadcast (`rollout.sync_transport: nccl`): the learner (rank 0) and the N workers (ranks 1..N) form their own
  process group, created directly from a `TCPStore` hosted by the learner, so it is independent of the learners'
  data-parallel group and of the default group an engine may create for itself (vLLM does). Per bucket: a header
  `[payload bytes, specs bytes]`, the pickled `TensorSpec`s, then the flat payload, all broadcast from rank 0 on the
  GPU; a `[0, 0]` header ends the sync. The same protocol runs over gloo on CPU (the tests use that), NCCL on GPUs.
  NCCL needs one GPU per rank: the learner and the engines must sit on different devices.
- CUDA IPC (`cuda_ipc`): for a learner and engines sharing one GPU. The learner packs one bucket into GPU memory and
  hands out its IPC handle (`torch.multiprocessing.reductions.reduce_tensor`); each worker maps that memory and
  copies from it. The learner keeps the bucket alive until the driver asks for the next one (after every worker
  has loaded this one), so it holds one bucket of extra GPU memory.

Timeouts: the group is created with `rollout.sync_timeout_s` (a collective that stalls raises in the actors), and the
driver's `WeightSync` bounds every call with the same deadline, so a sync fails with a `WeightSyncError`.
"""

from __future__ import annotations

import pickle
import socket
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from posttrain.rollout.buckets import TensorSpec, bucket_specs, bucketize, pack_into, unpack_bucket

BACKENDS = ("nccl", "gloo")


def free_address() -> tuple[str, int]:
    """(this node's IP as Ray sees it, a TCP port free right now) for a rendezvous store (the weight broadcast group's,
    the data-parallel learners')."""
    import ray  # here, not at the top: only actors call this, and the learner classes import without ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def pickled_specs(specs: Sequence[TensorSpec]) -> torch.Tensor:
    """Specs as a uint8 tensor (what a collective can send); `unpickled_specs` reverses it."""
    return torch.frombuffer(bytearray(pickle.dumps(list(specs))), dtype=torch.uint8)


def unpickled_specs(data: torch.Tensor) -> list[TensorSpec]:
    return pickle.loads(data.cpu().numpy().tobytes())


class BroadcastGroup:
    """One member of the weight broadcast group: rank 0 (the learner) sends, ranks >= 1 (the workers) receive.

    Args:
        address: (host, port) of the rendezvous `TCPStore`, hosted by rank 0.
        rank, world_size: this member's rank; the learner plus the number of workers.
        backend: "nccl" (tensors on this process's current CUDA device) or "gloo" (CPU).
        timeout_s: how long joining and each collective may take before raising.
    """

    def __init__(self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float):
        if backend not in BACKENDS:
            raise ValueError(f"weight broadcast backend: unknown {backend!r}; allowed: {', '.join(BACKENDS)}")
        timeout = timedelta(seconds=timeout_s)
        host, port = address
        self.rank = rank
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        if backend == "nccl":
            if not torch.cuda.is_available() or not dist.is_nccl_available():
                raise RuntimeError("rollout.sync_transport=nccl needs CUDA and NCCL; use object_store on CPU")
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(self.store, rank, world_size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
            self.device = torch.device("cpu")

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> dict[str, float]:
        """Rank 0: broadcast every bucket, then the end marker; returns {"buckets", "bytes", "seconds"}."""
        start, buckets, total = time.perf_counter(), 0, 0
        for bucket in bucketize(named_tensors, bucket_bytes):
            specs, size = bucket_specs(bucket)
            flat = torch.empty(size, dtype=torch.uint8, device=self.device)
            pack_into(bucket, specs, flat)
            meta = pickled_specs(specs).to(self.device)
            self._broadcast(torch.tensor([size, meta.numel()], dtype=torch.int64, device=self.device))
            self._broadcast(meta)
            self._broadcast(flat)
            buckets, total = buckets + 1, total + size
            del bucket, flat
        self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"buckets": float(buckets), "bytes": float(total), "seconds": time.perf_counter() - start}

    def receive(self, engine) -> dict[str, float]:
        """Ranks >= 1: load buckets into `engine` until the end marker; returns {"buckets", "bytes", "seconds"}."""
        start, buckets, total = time.perf_counter(), 0, 0
        while True:
            header = torch.empty(2, dtype=torch.int64, device=self.device)
            self._broadcast(header)
            size, meta_bytes = (int(x) for x in header.tolist())
            if meta_bytes == 0:
                break
            meta = torch.empty(meta_bytes, dtype=torch.uint8, device=self.device)
            self._broadcast(meta)
            flat = torch.empty(size, dtype=torch.uint8, device=self.device)
            self._broadcast(flat)
            engine.load_weights(unpack_bucket(unpickled_specs(meta), flat))
            buckets, total = buckets + 1, total + size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"buckets": float(buckets), "bytes": float(total), "seconds": time.perf_counter() - start}


class IpcSender:
    """The learner's CUDA IPC stream: `next()` packs the next bucket on the GPU and returns (specs, handle)."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int):
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.sync_transport=cuda_ipc needs CUDA; use object_store on CPU")
        self._buckets = bucketize(named_tensors, bucket_bytes)
        self._current: torch.Tensor | None = None

    def next(self):
        from torch.multiprocessing.reductions import reduce_tensor

        self._current = None  # the previous bucket: every worker has loaded it by now
        bucket = next(self._buckets, None)
        if bucket is None:
            return None
        specs, size = bucket_specs(bucket)
        flat = torch.empty(size, dtype=torch.uint8, device=torch.device("cuda", torch.cuda.current_device()))
        pack_into(bucket, specs, flat)
        torch.cuda.synchronize()  # the copies are done before another process reads the memory
        self._current = flat
        return specs, reduce_tensor(flat)


REBUILD_DEVICE_ARG = 6
"""index of the CUDA device in `reduce_tensor`'s rebuild arguments (`rebuild_cuda_tensor(..., storage_device, ...)`)"""


def load_ipc_bucket(engine, specs: Sequence[TensorSpec], handle) -> dict[str, float]:
    """Map the learner's bucket from its IPC handle and load it into `engine`; returns {"bytes", "seconds"}.

    The handle names the GPU by the learner's device index; Ray gives each actor its own `CUDA_VISIBLE_DEVICES`, so
    the index is replaced by this process's current device, which is the same physical GPU when colocated.
    """
    start = time.perf_counter()
    rebuild, args = handle
    args = list(args)
    args[REBUILD_DEVICE_ARG] = torch.cuda.current_device()
    flat = rebuild(*args)
    engine.load_weights(unpack_bucket(specs, flat))
    torch.cuda.synchronize()
    nbytes = sum(spec.nbytes for spec in specs)
    del flat
    return {"bytes": float(nbytes), "seconds": time.perf_counter() - start}
