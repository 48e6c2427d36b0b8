"""Data-parallel learners: `placement.learners: M` learner actors train as one torch.distributed group.

The driver holds a `LearnerGroup` (`learner/actors.py`) and uses it like the single learner actor
(`group.train_step.remote(batch)`, `ray.get(...)`). One rollout batch:
  1. The driver splits it by whole rows (`shard_plan`): the global mini-batch i (the same row ranges one learner
     would cut, `np.linspace` over the batch) is cut into M near-equal parts and rank r gets part r of every
     mini-batch, with the bounds of its local mini-batches. A part may have no rows (a batch smaller than
     M x mini_batches); that rank still joins every collective.
  2. Each rank takes lp_old / lp_ref of its rows (no communication). For each optimizer step the normalisers
     (tokens and sequences with loss, `algorithms/reduction.py`) are all-reduced first, so each rank's loss is
     exactly its share of the whole step's loss; the gradients are then all-reduced by SUM (the shares add up to the
     full batch's gradient; no 1/M), clipped, and every rank takes the same AdamW step, so the parameters stay equal.
     At start-up rank 0 broadcasts its trainable parameters, so the ranks also start equal.
  3. Metrics: the ranks' running stats are gathered and merged (loss sums add, token-weighted means pool, min/max
     over ranks; `grad_norm`, the same everywhere, is not summed): every rank returns what one learner would log.
Rank 0 alone saves checkpoints and the final model and serves `get_weights`; every rank loads a checkpoint (on
several nodes the run folder must be on shared storage, as for one learner).

Backend: gloo when the learners are on CPU, NCCL when they have GPUs (`placement.learner_gpus > 0`). Rank 0 picks
its node's address and a free port; all ranks join with `placement.timeout_s`, so a peer that never comes fails
with an error naming the key instead of hanging; the same timeout bounds every later collective, so when one rank
fails mid-step the others raise too once their next collective times out, and the driver sees the first error.
"""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.models.training import Stats
from posttrain.rollout.gpu_sync import free_address

REPLICATED_STATS = ("grad_norm",)
"""running sums that are the same on every rank (computed after the all-reduce): averaged over ranks, not summed"""
BUCKET_BYTES = 64 * 2**20
"""gradients are all-reduced in flat buckets of about this size (not one collective per tensor)"""


def shard_plan(num_rows: int, mini_batches: int, world_size: int) -> list[tuple[list[int], list[int]]]:
    """Per rank: (its rows of the global batch, in order; the bounds of its local mini-batches).

    Global mini-batch i is rows [b_i, b_i+1) with b = linspace(0, num_rows, min(mini_batches, num_rows) + 1) rounded,
    as `LearnerImpl.train_step` cuts a batch; its rows are cut into `world_size` near-equal contiguous parts the
    same way, and rank r's shard is its part of each mini-batch, concatenated. Local bounds: [0, ..., len(rows)].
    """
    n_mini = max(1, min(mini_batches, num_rows))
    bounds = np.linspace(0, num_rows, n_mini + 1).round().astype(int)
    plan: list[tuple[list[int], list[int]]] = [([], [0]) for _ in range(world_size)]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cuts = np.linspace(lo, hi, world_size + 1).round().astype(int)
        for rank, (rows, local_bounds) in enumerate(plan):
            rows.extend(range(int(cuts[rank]), int(cuts[rank + 1])))
            local_bounds.append(len(rows))
    return plan


def merge_stats(parts: list[Stats]) -> Stats:
    """The running metrics of all ranks as one learner's on the whole batch (see the module docstring)."""
    merged = Stats()
    for part in parts:
        for name, value in part.sums.items():
            merged.sums[name] = merged.sums.get(name, 0.0) + value
        for name, pairs in part.weighted.items():
            merged.weighted.setdefault(name, []).extend(pairs)
        for name, value in part.low.items():
            merged.low[name] = min(merged.low.get(name, math.inf), value)
        for name, value in part.high.items():
            merged.high[name] = max(merged.high.get(name, -math.inf), value)
    for name in REPLICATED_STATS:
        if name in merged.sums:
            merged.sums[name] /= len(parts)
    return merged


def local_tensors(tensors) -> list[torch.Tensor]:
    """What this rank holds of each tensor (a DTensor's local shard; a plain tensor itself)."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def local_numel(tensors) -> int:
    """Elements this rank holds of `tensors` (a DTensor counts its local shard only)."""
    return sum(t.numel() for t in local_tensors(tensors))


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds: all parameters, trainable ones, their gradients, and the optimizer's state tensors."""

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in local_tensors(tensors))

    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    return {
        "params": nbytes(params),
        "trainable": nbytes(p for p in params if p.requires_grad),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(state),
    }


class DataParallelLearnerImpl(LearnerImpl):
    """One rank of the group: a `LearnerImpl` whose collectives hooks run over torch.distributed."""

    def __init__(self, settings: LearnerSettings, teacher=None, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        super().__init__(settings, teacher)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device if self.device.index is not None else 0)

    def address(self) -> tuple[str, int]:
        """(host, port) for the group's rendezvous; asked of rank 0."""
        return free_address()

    def join(self, host: str, port: int, timeout_s: float) -> int:
        """Form the process group with the other ranks (all call this at once); returns this rank.

        Raises `TimeoutError` naming `placement.timeout_s` when a peer does not join within `timeout_s`.
        """
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(
                backend,
                init_method=f"tcp://{host}:{port}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=timeout_s),
            )
            self._all_sum(1.0)  # every peer really reachable (NCCL connects lazily, on the first collective)
        except Exception as err:  # torch raises DistStoreError / RuntimeError / DistNetworkError depending on the stage
            raise TimeoutError(
                f"learner rank {self.rank}: the data-parallel group of {self.world_size} learners ({backend}, "
                f"rendezvous tcp://{host}:{port}) did not form within {timeout_s:g}s (placement.timeout_s); "
                f"a learner did not start or cannot reach rank 0: {type(err).__name__}: {err}"
            ) from err
        self._broadcast_parameters()
        return self.rank

    def reset(self, settings: LearnerSettings) -> bool:
        """Rebuild the model and optimizer from `settings` inside the formed group (no new processes; every rank
        must call it): reusing the actors for another configuration (tests, sweeps) skips their start-up."""
        LearnerImpl.__init__(self, settings, self.teacher)
        self._broadcast_parameters()
        return True

    def _broadcast_parameters(self) -> None:
        """Every rank starts from rank 0's trainable parameters (LoRA's random init included)."""
        with torch.no_grad():
            for param in self.model.parameters():
                if param.requires_grad:
                    dist.broadcast(param.data, src=0)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds (params, trainable, grads, optimizer state) and its parameter count (`numel`)."""
        return local_bytes(self.model, self.optimizer) | {"numel": local_numel(self.model.parameters())}

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def _all_sum(self, *values: float) -> tuple[float, ...]:
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return tuple(total.tolist())

    def _all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        # a parameter without a gradient on every rank keeps none (as with one learner: AdamW then skips it)
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        grads = []
        for param, has in zip(params, has_grad.tolist(), strict=True):
            if has:
                if param.grad is None:  # this rank's share had no loss tokens
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        for bucket in _buckets(grads, BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            for grad, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket), strict=True):
                grad.copy_(reduced)

    def _reduce_stats(self, stats: Stats) -> Stats:
        parts: list[Stats | None] = [None] * self.world_size
        dist.all_gather_object(parts, stats)
        return merge_stats(parts)


def _buckets(tensors: list[torch.Tensor], max_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype, same-device tensors of at most ~`max_bytes` (one tensor may exceed it)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = buckets[-1] if buckets else None
        if last and last[0].dtype == t.dtype and last[0].device == t.device and size + nbytes <= max_bytes:
            last.append(t)
            size += nbytes
        else:
            buckets.append([t])
            size = nbytes
    return buckets
