"""`model.matmul_precision`: validated by the schema, and set in every process that trains the model, not in the rollout
workers (asked of the learner and rollout worker actors themselves, not of the settings handed to them)."""

import pytest
import torch

from posttrain.config import ConfigError, validate_config
from posttrain.learner.teacher import TeacherImpl, TeacherSettings
from posttrain.models.loading import set_matmul_precision
from posttrain.models.tiny import tiny_model_path
from posttrain.online import components
from posttrain.online.ppo import critic_settings

BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}, "rewards": [{"fn": "math_accuracy"}]}


def _precision_of(ray, actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda _: torch.get_float32_matmul_precision()), timeout=60)


def test_default_is_highest_and_bad_values_name_the_key():
    assert validate_config(BASE).model.matmul_precision == "highest"
    with pytest.raises(ConfigError, match="model.matmul_precision"):
        validate_config({**BASE, "model": {"path": "m", "matmul_precision": "low"}})


def test_setter_refuses_unknown_values_naming_the_caller_key():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(ValueError, match=r"TeacherSettings.matmul_precision: unknown 'fast'"):
        set_matmul_precision("fast", "TeacherSettings.matmul_precision")
    assert torch.get_float32_matmul_precision() == before


def test_settings_of_the_other_model_processes_carry_it():
    cfg = validate_config({**BASE, "model": {"path": "m", "matmul_precision": "medium"}})
    assert components.learner_settings(cfg, "m").matmul_precision == "medium"
    assert critic_settings(cfg, "m").matmul_precision == "medium"
    assert components.learner_settings(validate_config(BASE), "m").matmul_precision == "highest"


def test_teacher_sets_its_process():
    before = torch.get_float32_matmul_precision()
    try:
        TeacherImpl(TeacherSettings(str(tiny_model_path()), device="cpu", num_threads=1, matmul_precision="medium"))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_learner_process_runs_at_the_recipe_precision_and_the_rollout_workers_at_highest(ray_session):
    path, precision = str(tiny_model_path()), "medium"  # not torch's default, so only the wiring can produce it
    cfg = validate_config({**BASE, "model": {"path": path, "matmul_precision": precision}})
    learner = components.start_learner(cfg, path)
    pool = components.start_rollout_pool(cfg, path)
    try:
        assert _precision_of(ray_session, learner) == precision
        # decoding measured 1.6x slower with `medium` (docs/measurements.md): the workers keep float32
        assert [_precision_of(ray_session, w) for w in pool.workers] == ["highest"]
    finally:
        ray_session.kill(learner)
        for worker in pool.workers:
            ray_session.kill(worker)
