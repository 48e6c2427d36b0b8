"""`rollout.dtype`: the rollout engines' weights dtype, apart from the learner's (e.g. bf16 engines, fp32 learner)."""

import pytest
import torch

from posttrain.config import ConfigError, validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online import components

BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}


def test_default_follows_model_dtype_and_bad_values_name_the_key():
    assert validate_config(BASE).rollout.dtype is None
    with pytest.raises(ConfigError, match="rollout.dtype"):
        validate_config({**BASE, "rollout": {"dtype": "int8"}})


def test_a_cast_needs_the_object_store_transport():
    with pytest.raises(ConfigError, match=r"rollout.dtype: bfloat16 engines for a float32 learner.*object_store"):
        validate_config({**BASE, "rollout": {"dtype": "bfloat16", "sync_transport": "nccl"}})
    same = {"dtype": "float32", "sync_transport": "nccl"}  # nothing to cast
    assert validate_config({**BASE, "rollout": same}).rollout.dtype == "float32"


def test_the_workers_hold_the_rollout_dtype_and_syncs_are_cast(ray_session):
    path = str(tiny_model_path())
    cfg = validate_config({**BASE, "model": {"path": path}, "rollout": {"dtype": "bfloat16"}})
    pool = components.start_rollout_pool(cfg, path)
    try:
        worker = pool.workers[0]
        weights = ray_session.get(worker.get_weights.remote(["lm_head.weight"]))
        assert weights["lm_head.weight"].dtype == torch.bfloat16
        update = torch.full_like(weights["lm_head.weight"], 0.1, dtype=torch.float32)  # what a float32 learner sends
        ray_session.get(worker.load_weights.remote({"lm_head.weight": update}))
        held = ray_session.get(worker.get_weights.remote(["lm_head.weight"]))["lm_head.weight"]
        assert held.dtype == torch.bfloat16 and torch.equal(held, update.to(torch.bfloat16))
    finally:
        for w in pool.workers:
            ray_session.kill(w)
