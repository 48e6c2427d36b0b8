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

Where the pieces live: the packing in `rollout/buckets.py` (no Ray); the learner's end of every transport in
`rollout/weight_sender.py` (importable without Ray); here the workers' end (`WeightReceiver`) and the driver.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray

from posttrain.rollout.buckets import TensorSpec, unpack_bucket
from posttrain.rollout.gpu_sync import BroadcastGroup, load_ipc_bucket

TRANSPORTS = ("object_store", "nccl", "cuda_ipc")


class WeightSyncError(RuntimeError):
    """A weight sync failed or could not finish in time; the message names the part and the seconds waited."""


# --------------------------------------------------------------------------------- object store: the workers' end


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


# --------------------------------------------------------------------------------- the workers' end, as a mixin


class WeightReceiver:
    """A rollout worker's side of every transport (mixed into `RolloutWorkerImpl`; needs `self.engine`)."""

    def load_weight_buckets(self, refs: Sequence[ray.ObjectRef], timeout_s: float) -> dict[str, float]:
        """Object store: fetch the buckets and load them one at a time; {"buckets", "bytes", "seconds"}."""
        return load_buckets(self.engine, refs, timeout_s)

    def join_weight_group(
        self, address: tuple[str, int], rank: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Collective transports: become `rank` (>= 1) of the learner's broadcast group."""
        self._weight_group = BroadcastGroup(address, rank, world_size, backend, timeout_s)

    def receive_weights(self) -> dict[str, float]:
        """Collective transports: receive and load buckets until the learner's end marker."""
        return self._weight_group.receive(self.engine)

    def load_ipc_bucket(self, specs: Sequence[TensorSpec], handle) -> dict[str, float]:
        """CUDA IPC: load one bucket straight from the learner's GPU memory."""
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
