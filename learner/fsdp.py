"""Sharded data-parallel learners (`placement.sharding: fsdp`): the M learners of a `LearnerGroup` hold 1/M of the
parameters, gradients and AdamW state each, with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

What works where (found with a 2-process gloo script on this torch 2.13 CPU build before writing this):
  - FSDP2 runs on CPU over gloo: each decoder layer (`_no_split_modules`) is one FSDP unit and the root module holds
    the rest (embeddings, final norm, LM head; tied weights stay in one unit); parameters become `DTensor`s of 1/M
    rows each; AdamW and `clip_grad_norm_` work on them (the norm is the global one: each shard's partial norm is
    reduced over the ranks).
  - FSDP2 averages gradients over ranks by default; here each rank's loss is already its share of the whole step's
    loss (`learner/data_parallel.py`), so the ranks' gradients must be summed: divide factor 1 with sum-only collectives
    (gloo has no PREMUL_SUM, which a plain divide factor of 1 would use).
  - A forward on a batch of 0 rows fails inside the HF attention (cannot reshape 0 elements), so a rank with fewer
    micro-batches than its peers runs dummy passes of one 1-token row with a zero loss instead (below).
  - `unshard()` / `reshard()` of every unit swaps the full tensors in and out, so the existing merge / save / sync
    code reads the full weights unchanged while the model is unsharded.
  - NCCL/GPU is the same code with `device: cuda` but is not tested here (no GPU on these machines).

How a step differs from plain data parallelism:
  - Every forward is a collective (each unit all-gathers its parameters) and every backward too (each unit
    reduce-scatters its gradients), so all ranks must run the same number of passes in the same order. A rank's
    share of a batch may have fewer micro-batches (or none): before the passes the ranks agree on the largest count
    and the short ranks add dummy passes at the end (forward, and backward of `0 * logits.sum()`, which adds exactly
    zero to every gradient). The log-prob passes (policy, then reference) are padded the same way.
  - Gradients are reduce-scattered by FSDP during backward, so `_all_reduce_grads` has nothing left to reduce.
  - Reading the full weights (weight sync to the engines, the LoRA adapter, the final model, `get_weights`) is a
    collective: every rank unshards, rank 0 reads, every rank reshards. `LearnerGroup` sends these calls to every
    rank and returns rank 0's answer. Memory, stated: during that call each rank holds the whole model once
    (unit-by-unit streaming is not done). Only the object-store weight sync is supported (the config refuses
    `rollout.sync_transport` nccl / cuda_ipc with sharding).
  - Checkpoints: the full trainable tensors and the full AdamW state are gathered to rank 0 and written in the very
    format one learner writes (`learner.pt`: tensors by parameter name, optimizer state by parameter index), so a
    checkpoint moves between `sharding: none` and `fsdp` and between learner counts; every rank loads its shard of it.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

from posttrain.learner.batch import TrainBatch, micro_batches
from posttrain.learner.data_parallel import DataParallelLearnerImpl
from posttrain.models.lora import plain_model, save_merged
from posttrain.models.lora_adapter import lora_adapter
from posttrain.models.training import Stats, restore_rng_state
from posttrain.rollout.buckets import skip_tied

SHARDINGS = ("none", "fsdp")


def shard_model(model: torch.nn.Module) -> list[FSDPModule]:
    """Apply FSDP2 to `model` in place: one unit per decoder layer (the classes in the HF model's
    `_no_split_modules`), the root for the rest; gradients summed over the ranks. Returns the units, root last."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    layer_classes = set(getattr(base, "_no_split_modules", None) or ())
    for module in list(base.modules()):
        if type(module).__name__ in layer_classes:
            fully_shard(module)
    fully_shard(model)
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_gradient_divide_factor(1.0)  # sum, not average: each rank's loss is its share of the step's
        unit.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no PREMUL_SUM)
    return units


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()`'s entries (tied weights under each name) read from the live tensors, detached: on an
    unsharded FSDP2 model they are the full tensors, where `state_dict()` itself would reshard the model first."""
    state = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False)}
    for prefix, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[f"{prefix}.{name}" if prefix else name] = buffer.detach()
    return state


def to_index_keyed(optim_state: dict, names: list[str]) -> dict:
    """A full optimizer state dict keyed by parameter name (`get_state_dict`) as `torch.optim.Optimizer.state_dict()`
    keys it: by the parameter's index in `names` (the optimizer's parameter order)."""
    index = {name: i for i, name in enumerate(names)}
    return {
        "state": {index[name]: value for name, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim_state["param_groups"]],
    }


def to_name_keyed(optim_state: dict, names: list[str]) -> dict:
    """The inverse of `to_index_keyed`."""
    return {
        "state": {names[i]: value for i, value in optim_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]],
    }


class FSDPLearnerImpl(DataParallelLearnerImpl):
    """One rank of a sharded group: `DataParallelLearnerImpl` whose model (and reference) are FSDP2-sharded once the
    process group has formed (see the module docstring)."""

    def join(self, host: str, port: int, timeout_s: float) -> int:
        rank = super().join(host, port, timeout_s)  # forms the group, rank 0's trainable weights to every rank
        self._shard()
        return rank

    def reset(self, settings) -> bool:
        super().reset(settings)
        self._shard()
        return True

    def _shard(self) -> None:
        if self.settings.quantize != "none":
            raise ValueError("placement.sharding: fsdp cannot shard 4-bit (QLoRA) base weights; use sharding: none")
        self.units = shard_model(self.model)
        self.ref_units = shard_model(self.ref_model) if self.ref_model is not None else []
        # the (fresh, stateless) optimizer steps the sharded parameters now: the same ones, in the same order
        (group,) = self.optimizer.param_groups
        params = [p for p in self.model.parameters() if p.requires_grad]
        if len(params) != len(group["params"]) or self.optimizer.state:
            raise RuntimeError("FSDP learner: the optimizer does not match the sharded model's trainable parameters")
        group["params"] = params

    # ------------------------------------------------------------------------------------------- equal passes

    def _max_over_ranks(self, value: int) -> int:
        total = torch.tensor([value], dtype=torch.int64, device=self.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(total, op=dist.ReduceOp.MAX)
        return int(total)

    def _dummy_pass(self, with_grad: bool) -> None:
        """One forward (and backward of a zero loss) of a 1-token row: joins the collectives of a pass, changes no
        gradient. With a reference, its forward follows, as in `logprobs`."""
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        if with_grad:
            (self.model(input_ids=ids, use_cache=False).logits.sum() * 0.0).backward()
            return
        with torch.no_grad():
            self.model(input_ids=ids, use_cache=False)
            if self.has_reference:
                (self.ref_model or self.model)(input_ids=ids, use_cache=False)

    def logprobs(self, batch: TrainBatch):
        passes = math.ceil(len(batch) / self.settings.micro_batch_size)
        most = self._max_over_ranks(passes)
        result = super().logprobs(batch)
        self.model.eval()
        try:
            for _ in range(most - passes):
                self._dummy_pass(with_grad=False)
        finally:
            self.model.train()
        self._reshard()
        return result

    def _reshard(self) -> None:
        """Free every unit's full parameters. FSDP2 keeps the root unit's unsharded after a forward (for the backward
        that usually follows), so after no-grad passes `model.parameters()` would list the root's full tensors, not
        the sharded ones the optimizer and clipping must see (a rank with no update passes of its own would then clip
        fewer gradients than its peers: a collective mismatch)."""
        for unit in self.units + self.ref_units:
            unit.reshard()

    def _update(self, batch: TrainBatch, stats: Stats) -> int:
        # the backward passes `LearnerImpl._update` will run: its micro-batches that have loss tokens
        s = self.settings
        self._planned = sum(
            1
            for mb in micro_batches(batch, s.micro_batch_size, s.micro_batch_tokens)
            if float(mb.loss_mask_BC.sum()) > 0
        )
        self._most = self._max_over_ranks(self._planned)
        self._passes = 0
        self._reshard()  # the parameters `LearnerImpl._update` lists are the sharded ones
        return super()._update(batch, stats)

    def _micro_batch_backward(self, mb, norm, stats) -> None:
        self._passes += 1
        super()._micro_batch_backward(mb, norm, stats)

    def _all_reduce_grads(self, params) -> None:
        """FSDP reduce-scattered the gradients during backward; the short ranks add their dummy passes here."""
        if self._passes != self._planned:
            raise RuntimeError(
                f"FSDP learner rank {self.rank}: ran {self._passes} backward passes, planned {self._planned}"
            )
        for _ in range(self._most - self._passes):
            self._dummy_pass(with_grad=True)

    # ------------------------------------------------------------------------------------------- full weights

    @contextlib.contextmanager
    def _unsharded(self):
        """Every unit's full parameters in place (a collective: every rank must enter), resharded on exit."""
        for unit in self.units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in self.units:
                unit.reshard()

    def _is_peft(self) -> bool:
        return hasattr(self.model, "get_base_model")

    def sync_tensors(self, only_changed: bool):
        if self._is_peft():  # the LoRA merge reads the layers' own tensors, not the model's state_dict
            return super().sync_tensors(only_changed)
        return skip_tied(iter(plain_state(self.model).items()))

    def get_weights(self, only_changed: bool = True):
        with self._unsharded():
            if self.rank != 0:
                return {}
            if self._is_peft():
                return super().get_weights(only_changed)
            return {name: t.detach().cpu().clone() for name, t in plain_state(self.model).items()}

    def get_lora_adapter(self):
        with self._unsharded():
            return lora_adapter(self.model, plain_state(self.model)) if self.rank == 0 else None

    def save_final(self, out_dir: str) -> str:
        """One learner's final folder: the full (merged) weights in a fresh plain model, saved by rank 0."""
        weights = self.get_weights(only_changed=False)
        if self.rank != 0:
            return out_dir
        base = self.model.get_base_model() if self._is_peft() else self.model
        return str(save_merged(plain_model(base, weights), self.tokenizer, out_dir))

    def put_weight_buckets(self, bucket_bytes: int, only_changed: bool = True) -> list:
        with self._unsharded():
            return super().put_weight_buckets(bucket_bytes, only_changed) if self.rank == 0 else []

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "placement.sharding: fsdp syncs weights over the object store only; set rollout.sync_transport: "
            "object_store"
        )

    weight_group_address = join_weight_group = broadcast_weights = next_ipc_bucket = _unsupported

    # ------------------------------------------------------------------------------------------- checkpoints

    def _trainable_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def _training_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The full trainable tensors and optimizer state, as one learner's (a collective; full on rank 0 only)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        if self.rank != 0:
            return {}, {}
        names = self._trainable_names()
        return {n: model_state[n] for n in names}, to_index_keyed(optim_state, names)

    def save_checkpoint(self, out_dir: str) -> None:
        if self.rank == 0:
            super().save_checkpoint(out_dir)  # calls `_training_state`
        else:
            self._training_state()

    def load_checkpoint(self, ckpt_dir: str) -> int:
        state = self._read_checkpoint(ckpt_dir)
        names = self._trainable_names()
        unknown = sorted(set(state["trainable"]) - set(names))
        if unknown:
            raise ValueError(f"checkpoint {ckpt_dir} does not match the model: unknown parameters {unknown[:3]}")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["trainable"],
            optim_state_dict=to_name_keyed(state["optimizer"], names),
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"])
        self.steps_done = state["steps_done"]
        return self.steps_done
