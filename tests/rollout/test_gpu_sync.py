"""Collective and CUDA IPC weight transports. The broadcast protocol runs here over gloo (CPU); NCCL (2+ GPUs) and
CUDA IPC (a GPU shared by the learner and a worker) are gpu-marked and skip without CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ray", reason="needs ray (the learner and rollout workers are Ray actors)")

from posttrain.learner.actors import Learner
from posttrain.learner.learner import LearnerSettings
from posttrain.models.loading import load_model
from posttrain.rollout.buckets import TensorSpec
from posttrain.rollout.gpu_sync import pickled_specs, unpickled_specs
from posttrain.rollout.weight_sync import WeightSync
from posttrain.rollout.worker import RolloutWorker


def test_specs_survive_the_trip_through_a_uint8_tensor():
    specs = [TensorSpec("a.weight", "bfloat16", (3, 4), 0, 24), TensorSpec("b", "int64", (), 64, 8)]
    data = pickled_specs(specs)
    assert data.dtype == torch.uint8 and data.dim() == 1
    assert unpickled_specs(data) == specs


def _start(ray, learner_path, worker_path, workers: int, learner_options=None, worker_options=None):
    learner = Learner.options(**(learner_options or {})).remote(
        LearnerSettings(model_path=str(learner_path), num_threads=1)
    )
    actors = [
        RolloutWorker.options(**(worker_options or {})).remote(engine="hf", model_path=str(worker_path), num_threads=1)
        for _ in range(workers)
    ]
    ray.get([learner.ready.remote()] + [w.ready.remote() for w in actors], timeout=300)
    return learner, actors


def _assert_workers_hold(ray, actors, expected: dict[str, torch.Tensor]) -> None:
    for worker in actors:
        synced = ray.get(worker.get_weights.remote(), timeout=120)
        assert synced.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(synced[name].cpu(), tensor), name


def test_broadcast_group_over_gloo_syncs_every_worker_twice(ray_session, model_path, other_model_path):
    """The NCCL transport's protocol (header, specs, payload per bucket, end marker) with gloo on CPU: two workers
    receive the learner's weights bitwise; the second sync reuses the group."""
    ray = ray_session
    learner, actors = _start(ray, other_model_path, model_path, workers=2)
    try:
        sync = WeightSync(learner, actors, "nccl", bucket_mb=0.05, timeout_s=120, backend="gloo")
        metrics = sync()
        assert metrics["sync/buckets"] > 1 and metrics["sync/megabytes"] > 0.1
        _assert_workers_hold(ray, actors, load_model(str(other_model_path)).state_dict())
        ray.get([w.load_weights.remote(load_model(str(model_path)).state_dict()) for w in actors], timeout=120)
        assert sync()["sync/buckets"] == metrics["sync/buckets"]
        _assert_workers_hold(ray, actors, load_model(str(other_model_path)).state_dict())
    finally:
        for actor in [learner, *actors]:
            ray.kill(actor)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank: 2 CUDA GPUs")
def test_nccl_broadcast_from_learner_gpu_to_worker_gpu(ray_session, model_path, other_model_path):
    ray = ray_session
    gpu = {"num_gpus": 1, "num_cpus": 0}
    learner, actors = _start(ray, other_model_path, model_path, 1, learner_options=gpu, worker_options=gpu)
    try:
        metrics = WeightSync(learner, actors, "nccl", bucket_mb=0.05, timeout_s=120)()
        assert metrics["sync/buckets"] > 1
        _assert_workers_hold(ray, actors, load_model(str(other_model_path)).state_dict())
    finally:
        for actor in [learner, *actors]:
            ray.kill(actor)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_between_learner_and_worker_sharing_a_gpu(ray_session, model_path, other_model_path):
    ray = ray_session
    half = {"num_gpus": 0.5, "num_cpus": 0}  # both actors on the one GPU: colocated
    learner, actors = _start(ray, other_model_path, model_path, 1, learner_options=half, worker_options=half)
    try:
        metrics = WeightSync(learner, actors, "cuda_ipc", bucket_mb=0.05, timeout_s=120)()
        assert metrics["sync/buckets"] > 1
        _assert_workers_hold(ray, actors, load_model(str(other_model_path)).state_dict())
        again = WeightSync(learner, actors, "cuda_ipc", bucket_mb=1024, timeout_s=120)()
        assert again["sync/buckets"] == 1
    finally:
        for actor in [learner, *actors]:
            ray.kill(actor)
