"""On-policy distillation end to end through Ray on tiny random models (teacher seed 0, student seed 1, one tokenizer):
a rollout worker, the teacher actor and the learner, 2 steps per loss, checking the metrics each loss must log."""

import math
from pathlib import Path

import pytest

from posttrain.config import validate_config
from posttrain.models.loading import load_tokenizer
from posttrain.models.tiny import build_tiny_model, tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

DATA = Path(__file__).parent / "data"
VARIED = {"fn": f"{DATA / 'half_constant_reward.py'}:varied"}
ALWAYS = ["loss", "opd/reverse_kl", "kl", "entropy", "response_length/mean", "time/generate", "time/train", "updates"]
HELD_OUT = {"kind": "arithmetic", "num_problems": 4, "seed": 5, "max_value": 9}


def recipe(tmp_path: Path, opd: dict, rewards=(), algorithm=(), teacher=None) -> dict:
    return {
        "name": "opd",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path(seed=1))},
        "opd": {"teacher": str(teacher or tiny_model_path(seed=0)), **opd},
        "data": {"kind": "arithmetic", "num_problems": 12, "seed": 1, "max_value": 9},
        "eval": {"data": HELD_OUT},
        "rewards": list(rewards),
        "algorithm": {"name": "opd", "prompts_per_step": 2, "samples_per_prompt": 3, **dict(algorithm)},
        "rollout": {"max_new_tokens": 10, "num_threads": 1},
        "train": {"steps": 2, "lr": 1e-2, "micro_batch_size": 4, "num_threads": 1},
        "logging": {"progress": False},
    }


def run(raw: dict, ray_session) -> list[dict]:
    trainer = OnlineTrainer(validate_config(raw))
    try:
        return read_metrics(trainer.run())
    finally:
        for actor in [trainer.learner, trainer.teacher, *trainer.pool.workers]:
            ray_session.kill(actor)


def _check(rows: list[dict], updates: int = 1) -> list[dict]:
    eval_before, *steps = rows
    assert eval_before["step"] == 0 and math.isfinite(eval_before["eval/reverse_kl"])
    assert [r["step"] for r in steps] == [1, 2] and math.isfinite(steps[-1]["eval/reverse_kl"])
    for row in steps:
        missing = [k for k in ALWAYS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["updates"] == updates and row["grad_norm"] > 0
        # two random models disagree: the sampled reverse KL is clearly positive
        assert row["opd/reverse_kl"] > 0.1
    return steps


def test_reverse_kl_without_rewards(tmp_path, ray_session):
    steps = _check(run(recipe(tmp_path, {"loss": "reverse_kl"}), ray_session))
    for row in steps:
        # one update per batch: ratio 1 and A = lp_T - lp, so the token-mean surrogate is the sampled reverse KL
        assert row["loss"] == pytest.approx(row["opd/reverse_kl"], abs=1e-5) and row["ratio/max"] == 1.0
        assert row["time/teacher"] > 0 and "reward/mean" not in row and "jsd" not in row


def test_jsd_with_rewards_logged_but_not_trained_on(tmp_path, ray_session):
    steps = _check(run(recipe(tmp_path, {"loss": "jsd", "beta": 0.5}, rewards=(VARIED,)), ray_session))
    for row in steps:
        assert 0 < row["jsd"] < math.log(2)  # a beta=0.5 JSD is at most ln 2
        assert row["loss"] == pytest.approx(row["jsd"], abs=1e-5) and row["jsd_loss"] == row["loss"]
        assert "ratio/max" not in row and "reward/mean" in row and "time/teacher" not in row


def test_reverse_kl_mixed_with_the_group_advantage_of_rewards(tmp_path, ray_session):
    raw = recipe(tmp_path, {"loss": "reverse_kl", "reward_coef": 1.0}, rewards=(VARIED,))
    raw["algorithm"]["epochs_per_batch"] = 2
    steps = _check(run(raw, ray_session), updates=2)
    for row in steps:
        assert "reward/mean" in row and row["ratio/max"] > 1.0  # the second update sees a moved policy
    # group-relative advantages sum to 0 per group but not per token: with rewards in, the loss is no longer the KL
    assert any(abs(r["loss"] - r["opd/reverse_kl"]) > 1e-3 for r in steps)


def test_a_teacher_with_another_tokenizer_is_refused_before_any_work(tmp_path):
    other = build_tiny_model(tmp_path / "other-teacher", seed=0)
    tokenizer = load_tokenizer(str(other))
    tokenizer.add_tokens(["<think>"])
    tokenizer.save_pretrained(other)
    raw = recipe(tmp_path, {"loss": "reverse_kl"}, teacher=other)
    with pytest.raises(ValueError, match="do not share a tokenizer") as info:
        OnlineTrainer(validate_config(raw))
    assert str(other) in str(info.value) and str(tiny_model_path(seed=1)) in str(info.value)
    assert not (tmp_path / "runs").exists()  # no run folder, no actors
