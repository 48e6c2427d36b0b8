"""`placement:`: the bundle plan, the checks against the cluster (clear errors naming the key), placement groups with
CPU bundles on a real local Ray. (NCCL learners: the gpu test in tests/learner/test_data_parallel.py.)"""

import pytest
import ray

from posttrain.config import ConfigError, PlacementConfig, validate_config
from posttrain.online.placement import Placement, bundle_plan, check_cluster


def _recipe(placement: dict, workers: int = 1, algorithm: str = "grpo") -> dict:
    return {
        "model": {"path": "m"},
        "data": {"kind": "arithmetic"},
        "rewards": [{"fn": "math_accuracy"}],
        "algorithm": {"name": algorithm},
        "rollout": {"workers": workers},
        "placement": placement,
    }


@ray.remote(num_cpus=0)
class _Probe:
    def where(self):
        context = ray.get_runtime_context()
        return context.get_placement_group_id(), context.get_assigned_resources()


def test_separate_roles_get_one_bundle_per_actor_and_unplaced_roles_none():
    plan = bundle_plan(PlacementConfig(learners=2, learner_gpus=1, learner_cpus=2, rollout_cpus=1), rollout_workers=3)
    assert plan.bundles == [{"CPU": 2, "GPU": 1}] * 2 + [{"CPU": 1}] * 3
    assert plan.learner_bundles == [0, 1] and plan.rollout_bundles == [2, 3, 4]
    plan = bundle_plan(PlacementConfig(learners=2, learner_gpus=0.5), rollout_workers=1)
    assert plan.bundles == [{"GPU": 0.5}] * 2 and plan.rollout_bundles == [None]  # rollout asks nothing: unplaced
    assert bundle_plan(PlacementConfig(learners=3), rollout_workers=2).bundles == []  # the laptop default


def test_colocated_roles_share_bundle_i():
    p = PlacementConfig(learners=2, learner_gpus=0.5, rollout_gpus=0.5, rollout_cpus=1, colocate=True)
    plan = bundle_plan(p, rollout_workers=3)
    assert plan.bundles == [{"CPU": 1, "GPU": 1.0}] * 2 + [{"CPU": 1, "GPU": 0.5}]
    assert plan.learner_bundles == [0, 1] and plan.rollout_bundles == [0, 1, 2]


def test_more_gpus_than_the_cluster_has_names_the_keys():
    p = PlacementConfig(learners=2, learner_gpus=1, rollout_gpus=1)
    plan = bundle_plan(p, rollout_workers=1)
    nodes = [{"CPU": 16, "GPU": 1}]
    with pytest.raises(
        ConfigError, match=r"placement.learner_gpus \(2 learners x 1\) \+ placement.rollout_gpus .* 3 GPUs"
    ):
        check_cluster(p, 1, plan, {"CPU": 16, "GPU": 1}, nodes)
    with pytest.raises(ConfigError, match=r"placement.learner_cpus .* = 4 CPUs, but this Ray node has 2"):
        p = PlacementConfig(learners=2, learner_cpus=2)
        check_cluster(p, 1, bundle_plan(p, 1), {"CPU": 2}, [{"CPU": 2}])


def test_a_bundle_larger_than_any_node_names_the_keys():
    # 2 nodes of 1 GPU: 2 GPUs in all, but colocating 1 + 1 GPU needs 2 on one node
    p = PlacementConfig(learner_gpus=1, rollout_gpus=1, colocate=True)
    nodes = [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]
    with pytest.raises(ConfigError, match=r"one bundle needs 2 GPUs on one node, but the largest node has 1"):
        check_cluster(p, 1, bundle_plan(p, 1), {"CPU": 16, "GPU": 2}, nodes)
    p = PlacementConfig(learners=2, learner_gpus=1, strategy="STRICT_PACK")
    with pytest.raises(ConfigError, match=r"all bundles \(placement.strategy=STRICT_PACK\) needs 2 GPUs"):
        check_cluster(p, 1, bundle_plan(p, 1), {"CPU": 16, "GPU": 2}, nodes)
    check_cluster(p.model_copy(update={"strategy": "SPREAD"}), 1, bundle_plan(p, 1), {"GPU": 2}, nodes)  # fits


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"learner_gpus": 2}, "placement.learner_gpus"),
        ({"rollout_gpus": 1.5}, "placement.rollout_gpus: above 1 it must be a whole number"),
        ({"learners": 0}, "placement.learners"),
        ({"colocate": True}, "placement.colocate: nothing to colocate"),
        ({"strategy": "pack"}, "placement.strategy"),
    ],
)
def test_config_refuses_impossible_placements(placement, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(_recipe(placement))


def test_placement_is_for_online_algorithms_only():
    with pytest.raises(ConfigError, match="placement: only algorithm.name=grpo or .* uses this section \\(got sft"):
        validate_config({**_recipe({"learners": 2}, algorithm="sft"), "data": {"kind": "file", "path": "x.jsonl"}})
    assert validate_config(_recipe({"learners": 2})).placement.learners == 2


def test_cpu_bundles_place_the_actors_in_the_group(ray_session):
    cfg = validate_config(_recipe({"learners": 2, "learner_cpus": 0.5, "rollout_cpus": 0.25, "timeout_s": 60}))
    placement = Placement.create(cfg)
    try:
        assert placement.group is not None and len(placement.plan.bundles) == 3
        probes = [_Probe.options(**placement.learner_options(r)).remote() for r in range(2)]
        probes.append(_Probe.options(**placement.rollout_options(0)).remote())
        where = ray.get([p.where.remote() for p in probes], timeout=60)
        assert {group_id for group_id, _ in where} == {placement.group.id.hex()}
        assert [resources.get("CPU") for _, resources in where] == [0.5, 0.5, 0.25]
        for probe in probes:
            ray.kill(probe)
    finally:
        placement.remove()


def test_colocated_cpu_bundles_share_a_bundle(ray_session):
    cfg = validate_config(
        _recipe({"learner_cpus": 0.25, "rollout_cpus": 0.25, "colocate": True, "timeout_s": 60}, workers=1)
    )
    placement = Placement.create(cfg)
    try:
        assert placement.plan.bundles == [{"CPU": 0.5}]
        learner, worker = placement.learner_options(0), placement.rollout_options(0)
        assert learner["scheduling_strategy"].placement_group_bundle_index == 0
        assert worker["scheduling_strategy"].placement_group_bundle_index == 0
        probes = [_Probe.options(**learner).remote(), _Probe.options(**worker).remote()]
        assert len({g for g, _ in ray.get([p.where.remote() for p in probes], timeout=60)}) == 1
        for probe in probes:
            ray.kill(probe)
    finally:
        placement.remove()


def test_a_request_beyond_the_local_ray_fails_before_any_actor(ray_session):
    cpus = ray.cluster_resources()["CPU"]
    cfg = validate_config(_recipe({"learners": 2, "learner_cpus": cpus}))
    with pytest.raises(ConfigError, match=r"placement.learner_cpus \(2 learners x"):
        Placement.create(cfg)


def test_no_resources_asked_means_no_placement_group(ray_session):
    placement = Placement.create(validate_config(_recipe({"learners": 2})))
    assert placement.group is None and placement.learner_options(1) == {"num_cpus": 0.0, "num_gpus": 0.0}
