"""The learner's end of every weight-sync transport, as a mixin (`WeightSender`, mixed into `LearnerImpl`).

Importable without Ray: the learner classes run in-process too (tests, a GPU machine without Ray). Ray is needed only
by the object-store transport, which is only ever called inside the learner actor, so `put_buckets` imports it there.
The protocol (buckets, memory, timeouts) is described in `rollout/weight_sync.py`; the packing is `rollout/buckets.py`
and the GPU transports `rollout/gpu_sync.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from posttrain.models.lora import iter_merged_tensors
from posttrain.rollout.buckets import bucketize, pack_bucket, skip_tied
from posttrain.rollout.gpu_sync import BroadcastGroup, IpcSender, free_address


def put_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> list:
    """Learner side of the object store: pack and `ray.put` one bucket at a time; returns one `ray.ObjectRef` per
    bucket, in order.

    Each object is `(specs, buffer)`. Call it inside the learner actor: the refs it returns are owned there.
    """
    import ray  # here, not at the top: only the actor path needs ray (see the module docstring)

    refs = []
    for bucket in bucketize(named_tensors, bucket_bytes):
        refs.append(ray.put(pack_bucket(bucket)))
        del bucket  # drop this bucket's tensors (LoRA merges) before packing the next
    return refs


class WeightSender:
    """The learner's side of every transport (mixed into `learner.learner.LearnerImpl`; needs `self.model`)."""

    def sync_tensors(self, only_changed: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """What a sync sends: plain-named tensors, LoRA merged (only the adapted layers with `only_changed`)."""
        return skip_tied(iter_merged_tensors(self.model, only_lora_targets=only_changed))

    def put_weight_buckets(self, bucket_bytes: int, only_changed: bool = True) -> list:
        """Object store: pack and `ray.put` the buckets one at a time (no full copy held here); their refs, in order."""
        return put_buckets(self.sync_tensors(only_changed), bucket_bytes)

    def weight_group_address(self) -> tuple[str, int]:
        """Collective transports: (this node's IP, a free port) for the group's rendezvous store, hosted here."""
        return free_address()

    def join_weight_group(self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float) -> None:
        """Collective transports: become rank 0 of the broadcast group (the workers are ranks 1..world_size-1)."""
        self._weight_group = BroadcastGroup(address, 0, world_size, backend, timeout_s)

    def broadcast_weights(self, bucket_bytes: int, only_changed: bool = True) -> dict[str, float]:
        """Collective transports: broadcast every bucket to the group (see `gpu_sync.BroadcastGroup.send`)."""
        return self._weight_group.send(self.sync_tensors(only_changed), bucket_bytes)

    def next_ipc_bucket(self, bucket_bytes: int, only_changed: bool = True, restart: bool = False):
        """CUDA IPC: the next bucket packed on this GPU as (specs, IPC handle), or None after the last one. The buffer
        stays alive until the next call, so the workers must have loaded it by then (the driver waits for them)."""
        if restart or getattr(self, "_ipc_sender", None) is None:
            self._ipc_sender = IpcSender(self.sync_tensors(only_changed), bucket_bytes)
        item = self._ipc_sender.next()
        if item is None:
            self._ipc_sender = None
        return item
