"""RolloutWorker through Ray: same outputs as a local engine, weights broadcast by object reference."""

from __future__ import annotations

import pytest
import torch

from posttrain.models.loading import load_model
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.types import SamplingParams
from posttrain.rollout.worker import RolloutWorker, RolloutWorkerImpl


@pytest.fixture(scope="module")
def worker(ray_session, model_path):
    # the local engine's thread count: float32 sums split over other threads round differently, and the comparisons
    # below are bitwise
    actor = RolloutWorker.remote(engine="hf", model_path=str(model_path), num_threads=torch.get_num_threads())
    assert ray_session.get(actor.ready.remote(), timeout=120) is True
    yield actor
    ray_session.kill(actor)


def test_actor_greedy_equals_local_engine(ray_session, worker, engine, prompts):
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    remote = ray_session.get(worker.generate.remote(prompts, params), timeout=60)
    assert remote == engine.generate(prompts, params)


def test_load_weights_by_object_ref_and_by_dict(ray_session, worker, engine, other_model_path, model_path, prompts):
    ray = ray_session
    other_weights = load_model(str(other_model_path)).state_dict()
    ref = ray.put(other_weights)
    seconds = ray.get(worker.load_weights.remote([ref]), timeout=60)
    assert isinstance(seconds, float) and seconds >= 0
    synced = ray.get(worker.get_weights.remote(), timeout=60)
    assert set(synced) == set(other_weights)
    assert all(torch.equal(synced[name], other_weights[name]) for name in other_weights)
    params = SamplingParams(temperature=0, max_new_tokens=12)
    other = ray.get(worker.generate.remote(prompts, params), timeout=60)
    assert [c.token_ids for r in other for c in r.completions] != [
        c.token_ids for r in engine.generate(prompts, params) for c in r.completions
    ]

    # a plain dict works too; restoring the original weights restores the original outputs
    ray.get(worker.load_weights.remote(engine.get_weights()), timeout=60)
    assert ray.get(worker.generate.remote(prompts, params), timeout=60) == engine.generate(prompts, params)


def test_bad_weights_raise_through_ray(ray_session, worker):
    with pytest.raises(ValueError, match="no_such.weight"):
        ray_session.get(worker.load_weights.remote({"no_such.weight": torch.zeros(1)}), timeout=60)
    with pytest.raises(ValueError, match="ObjectRef"):
        ray_session.get(worker.load_weights.remote(["not a ref"]), timeout=60)


def test_pool_of_one_worker(ray_session, worker, engine, prompts):
    pool = RolloutPool([worker])
    params = SamplingParams(temperature=0, max_new_tokens=6)
    assert pool.generate(prompts, params) == engine.generate(prompts, params)
    assert pool.load_weights(ray_session.put(engine.get_weights(["model.norm.weight"]))) >= 0


def test_pool_broadcast_past_its_timeout_names_the_key(ray_session, worker, engine, prompts):
    """A worker still busy (here: generating) when the broadcast's time is up fails the call, naming the key."""
    pool = RolloutPool([worker])
    busy = worker.generate.remote(prompts * 4, SamplingParams(n=4, temperature=1.0, max_new_tokens=64, seed=0))
    weights = ray_session.put(engine.get_weights(["model.norm.weight"]))  # the worker's own: loading changes nothing
    expected = r"1 rollout workers did not load the weights within 0.01 s \(rollout.sync_timeout_s\)"
    with pytest.raises(TimeoutError, match=expected):
        pool.load_weights(weights, timeout_s=0.01)
    ray_session.get(busy, timeout=120)


def test_engine_choice_is_checked(model_path):
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        RolloutWorkerImpl(engine="sglang", model_path=str(model_path))
    with pytest.raises(ValueError, match="model_path"):
        RolloutWorkerImpl(engine="hf")
