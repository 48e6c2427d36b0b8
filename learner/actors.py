"""Every Ray actor class and Ray task of the learner side, and `LearnerGroup`, the data-parallel learners behind
one actor-like handle.

The classes they wrap (`LearnerImpl`, `CriticImpl`, `TeacherImpl`, `DataParallelLearnerImpl`, `FSDPLearnerImpl`)
import no Ray: they run in-process too (tests, the offline trainer's helpers, a GPU machine without Ray), and only
this module turns them into actors. The data-parallel protocol itself is described in `learner/data_parallel.py`.
"""

from __future__ import annotations

import ray
import torch

from posttrain.learner.batch import TrainBatch, select_rows
from posttrain.learner.critic import CriticImpl
from posttrain.learner.data_parallel import DataParallelLearnerImpl, shard_plan
from posttrain.learner.fsdp import SHARDINGS, FSDPLearnerImpl
from posttrain.learner.learner import LearnerImpl, LearnerSettings
from posttrain.learner.teacher import TeacherImpl, TeacherSettings

Learner = ray.remote(LearnerImpl)
Critic = ray.remote(CriticImpl)
Teacher = ray.remote(TeacherImpl)
DataParallelLearner = ray.remote(DataParallelLearnerImpl)
FSDPLearner = ray.remote(FSDPLearnerImpl)


def start_teacher(settings: TeacherSettings):
    """The teacher actor (one GPU when Ray has one to give, else CPU with all cores), loaded and ready."""
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 and settings.device != "cpu" else 0
    teacher = Teacher.options(num_cpus=0, num_gpus=gpus).remote(settings)
    ray.get(teacher.ready.remote())
    return teacher


@ray.remote(num_cpus=0)
def _first(*results):
    """Rank 0's result once every rank has finished (an error on any rank is raised to the caller)."""
    return results[0]


@ray.remote(num_cpus=0)
def _concat_logprobs(*parts):
    """The ranks' (policy, reference) log-probs of consecutive row ranges as one batch's."""
    policy = torch.cat([p for p, _ in parts])
    refs = [r for _, r in parts]
    return policy, None if refs[0] is None else torch.cat(refs)


class _Method:
    """`group.name.remote(...)`, as on an actor handle."""

    def __init__(self, fn):
        self._fn = fn

    def remote(self, *args, **kwargs):
        return self._fn(*args, **kwargs)


RANK0_METHODS = (
    "get_weights",
    "get_lora_adapter",
    "save_checkpoint",
    "save_final",
    "put_weight_buckets",
    "weight_group_address",
    "join_weight_group",
    "broadcast_weights",
    "next_ipc_bucket",
)
"""learner calls that read the (identical) weights or write files: rank 0 alone answers them"""


class LearnerGroup:
    """M data-parallel learner actors behind the single learner actor's calls, each `.remote(...)` returning one
    ObjectRef (so the driver code is the same for 1 or M learners): `train_step` and `logprobs` split the batch
    over the ranks, `load_checkpoint` and `ready` go to every rank, `RANK0_METHODS` to rank 0.

    `sharding="fsdp"` (`placement.sharding`): the ranks are `FSDPLearner`s (`learner/fsdp.py`) holding 1/M of the
    weights each; reading the weights is then a collective, so `RANK0_METHODS` go to every rank and return rank 0's
    answer, and `weight_sender` (what the weight sync calls) is the group itself instead of rank 0."""

    def __init__(
        self,
        settings: LearnerSettings,
        world_size: int,
        teacher=None,
        actor_options: list[dict] | None = None,
        timeout_s: float = 300.0,
        sharding: str = "none",
    ):
        if world_size < 1:
            raise ValueError(f"placement.learners must be >= 1, got {world_size}")
        if sharding not in SHARDINGS:
            raise ValueError(f"placement.sharding: unknown {sharding!r}; allowed: {', '.join(SHARDINGS)}")
        actor_class = FSDPLearner if sharding == "fsdp" else DataParallelLearner
        options = actor_options or [{"num_cpus": 0}] * world_size
        self.actors = [
            actor_class.options(**options[rank]).remote(settings, teacher, rank, world_size)
            for rank in range(world_size)
        ]
        self.sharding = sharding
        self.mini_batches = settings.mini_batches
        self.timeout_s = timeout_s
        for name in ("train_step", "logprobs", "load_checkpoint"):
            setattr(self, name, _Method(getattr(self, f"_{name}")))
        for name in RANK0_METHODS:
            if sharding == "fsdp":  # a collective: every rank takes part, rank 0 answers
                setattr(self, name, _Method(self._on_every_rank(name)))
            else:
                setattr(self, name, getattr(self.actors[0], name))
        self.weight_sender = self if sharding == "fsdp" else self.actors[0]
        """what a `WeightSync` calls: rank 0 alone holds the full weights unless they are sharded"""
        self.ready = _Method(lambda: _first.remote(*[a.ready.remote() for a in self.actors]))

    def start(self) -> LearnerGroup:
        """Wait for the models to load, then form the process group (raises `TimeoutError` if a rank is missing)."""
        ray.get([actor.ready.remote() for actor in self.actors])
        host, port = ray.get(self.actors[0].address.remote())
        ray.get([actor.join.remote(host, port, self.timeout_s) for actor in self.actors])
        return self

    def reset(self, settings: LearnerSettings) -> LearnerGroup:
        """Rebuild every rank's model and optimizer from `settings`, keeping the actors and their process group."""
        ray.get([actor.reset.remote(settings) for actor in self.actors])
        self.mini_batches = settings.mini_batches
        return self

    def shutdown(self) -> None:
        """Leave the process group and stop the actors."""
        try:
            ray.get([actor.leave.remote() for actor in self.actors], timeout=self.timeout_s)
        finally:
            for actor in self.actors:
                ray.kill(actor)

    def _train_step(self, batch: TrainBatch | ray.ObjectRef):
        if isinstance(batch, ray.ObjectRef):
            batch = ray.get(batch)
        plan = shard_plan(len(batch), self.mini_batches, len(self.actors))
        refs = [
            actor.train_step.remote(select_rows(batch, rows), bounds)
            for actor, (rows, bounds) in zip(self.actors, plan, strict=True)
        ]
        return _first.remote(*refs)

    def _logprobs(self, batch: TrainBatch | ray.ObjectRef):
        if isinstance(batch, ray.ObjectRef):
            batch = ray.get(batch)
        plan = shard_plan(len(batch), 1, len(self.actors))  # consecutive row ranges, in rank order
        refs = [
            actor.logprobs.remote(select_rows(batch, rows)) for actor, (rows, _) in zip(self.actors, plan, strict=True)
        ]
        return _concat_logprobs.remote(*refs)

    def _on_every_rank(self, name: str):
        def call(*args, **kwargs):
            return _first.remote(*[getattr(actor, name).remote(*args, **kwargs) for actor in self.actors])

        return call

    def _load_checkpoint(self, ckpt_dir: str):
        return _first.remote(*[actor.load_checkpoint.remote(ckpt_dir) for actor in self.actors])
