"""Where an online run's actors go: one Ray placement group for the rollout workers and the learners (`placement:`).

Each role asks for `*_cpus` / `*_gpus` per actor. Separate (the default): every actor of a role that asks for
something gets its own bundle. Colocated (`placement.colocate`): bundle i holds learner i's and rollout worker i's
resources together, so they land on one node (on one GPU when each asks for 0.5). The bundles form one placement
group laid out by `placement.strategy`. A role that asks for nothing is not placed: its actors take 0 CPUs and run
wherever Ray puts them (the laptop default, where generation and training take turns on the same cores).

Requests the cluster cannot hold fail before any actor starts, naming the key (`check_cluster`); a group that Ray
cannot place within `placement.timeout_s` (e.g. STRICT_SPREAD over too few nodes) fails naming the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from posttrain.config import ConfigError, PlacementConfig, RecipeConfig


@dataclass
class BundlePlan:
    bundles: list[dict[str, float]]
    """the placement group's bundles (none: nothing to place)"""
    learner_bundles: list[int | None]
    """bundle index of each learner (None: not placed)"""
    rollout_bundles: list[int | None]
    """bundle index of each rollout worker (None: not placed)"""


def _resources(cpus: float, gpus: float) -> dict[str, float]:
    return {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}


def bundle_plan(p: PlacementConfig, rollout_workers: int) -> BundlePlan:
    """The bundles and which actor goes in which (pure; see the module docstring)."""
    learner, rollout = _resources(p.learner_cpus, p.learner_gpus), _resources(p.rollout_cpus, p.rollout_gpus)
    if p.colocate and (learner or rollout):  # (the config refuses colocate without resources)
        bundles = []
        for i in range(max(p.learners, rollout_workers)):
            parts = ([learner] if i < p.learners else []) + ([rollout] if i < rollout_workers else [])
            merged: dict[str, float] = {}
            for part in parts:
                for key, value in part.items():
                    merged[key] = merged.get(key, 0.0) + value
            bundles.append(merged or {"CPU": 0.001})  # a role without resources still pins its actor to the node
        return BundlePlan(bundles, list(range(p.learners)), list(range(rollout_workers)))
    bundles: list[dict[str, float]] = []
    learner_idx: list[int | None] = [None] * p.learners
    rollout_idx: list[int | None] = [None] * rollout_workers
    if learner:
        learner_idx = list(range(p.learners))
        bundles += [dict(learner) for _ in range(p.learners)]
    if rollout:
        rollout_idx = [len(bundles) + j for j in range(rollout_workers)]
        bundles += [dict(rollout) for _ in range(rollout_workers)]
    return BundlePlan(bundles, learner_idx, rollout_idx)


def check_cluster(
    p: PlacementConfig, rollout_workers: int, plan: BundlePlan, total: dict[str, float], nodes: list[dict[str, float]]
) -> None:
    """Raise `ConfigError` naming the keys when the cluster (`total` resources, per-node `nodes`) cannot hold the
    plan: more of a resource than the whole cluster has, or a bundle (or, with STRICT_PACK, all of them) larger
    than the largest node."""
    where = "the Ray cluster" if len(nodes) > 1 else "this Ray node"
    for resource, key in (("GPU", "gpus"), ("CPU", "cpus")):
        per_learner, per_worker = getattr(p, f"learner_{key}"), getattr(p, f"rollout_{key}")
        need = p.learners * per_learner + rollout_workers * per_worker
        have = total.get(resource, 0.0)
        if need > have + 1e-9:
            raise ConfigError(
                f"placement.learner_{key} ({p.learners} learners x {per_learner:g}) + placement.rollout_{key} "
                f"({rollout_workers} rollout.workers x {per_worker:g}) = {need:g} {resource}s, but {where} has "
                f"{have:g}" + (" (ray.num_cpus sets a local Ray's CPUs)" if resource == "CPU" else "")
            )
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        sizes = [b.get(resource, 0.0) for b in plan.bundles]
        biggest = sum(sizes) if p.strategy == "STRICT_PACK" else max(sizes, default=0.0)
        if biggest > largest + 1e-9:
            what = "all bundles (placement.strategy=STRICT_PACK)" if p.strategy == "STRICT_PACK" else "one bundle"
            raise ConfigError(
                f"placement.learner_{key} / placement.rollout_{key}: {what} needs {biggest:g} {resource}s on one "
                f"node, but the largest node has {largest:g}"
            )


class Placement:
    """The run's placement group (or none) and the Ray options of each actor."""

    def __init__(self, cfg: RecipeConfig, plan: BundlePlan, group: PlacementGroup | None):
        self.p, self.plan, self.group = cfg.placement, plan, group

    @classmethod
    def create(cls, cfg: RecipeConfig) -> Placement:
        """Check the request against the cluster (Ray must be initialised) and reserve the placement group."""
        p = cfg.placement
        plan = bundle_plan(p, cfg.rollout.workers)
        if not plan.bundles:
            return cls(cfg, plan, None)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        check_cluster(p, cfg.rollout.workers, plan, ray.cluster_resources(), nodes)
        group = placement_group(plan.bundles, strategy=p.strategy, name="")
        try:
            ray.get(group.ready(), timeout=p.timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise ConfigError(
                f"placement: Ray could not place {len(plan.bundles)} bundles {plan.bundles} with "
                f"placement.strategy={p.strategy} within {p.timeout_s:g}s (placement.timeout_s); free resources: "
                f"{ray.available_resources()}"
            ) from None
        return cls(cfg, plan, group)

    @classmethod
    def unplaced(cls, cfg: RecipeConfig) -> Placement:
        """No placement group: every actor takes 0 CPUs (what runs did before `placement:` existed)."""
        return cls(cfg, BundlePlan([], [None] * cfg.placement.learners, [None] * cfg.rollout.workers), None)

    def _options(self, bundle: int | None, cpus: float, gpus: float) -> dict:
        options: dict = {"num_cpus": cpus, "num_gpus": gpus}
        if self.group is not None and bundle is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=bundle
            )
        return options

    def learner_options(self, rank: int) -> dict:
        """`.options(...)` of learner `rank`."""
        return self._options(self.plan.learner_bundles[rank], self.p.learner_cpus, self.p.learner_gpus)

    def rollout_options(self, index: int) -> dict:
        """`.options(...)` of rollout worker `index`."""
        return self._options(self.plan.rollout_bundles[index], self.p.rollout_cpus, self.p.rollout_gpus)

    def remove(self) -> None:
        """Give the reserved resources back (the actors placed in the group are stopped by Ray)."""
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
