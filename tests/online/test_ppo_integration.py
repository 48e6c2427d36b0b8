"""PPO end to end on a tiny random model through Ray (1 rollout worker + learner + critic): the metrics of a few
steps, the critic in the checkpoints, and a resumed run that continues from the saved critic."""

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.data.types import Sample
from posttrain.learner.batch import collate
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

VARIED = {"fn": f"{Path(__file__).parent / 'data' / 'half_constant_reward.py'}:varied"}
PPO_METRICS = [
    "loss",
    "pg_loss",
    "clip_fraction",
    "kl",
    "entropy",
    "reward/mean",
    "critic/value_loss",
    "critic/value_clipfrac",
    "critic/explained_variance",
    "critic/values_mean",
    "critic/grad_norm",
    "critic/lr",
    "ppo/returns_mean",
    "ppo/values_mean",
    "ppo/advantages_mean",
]


def recipe(tmp_path: Path, steps: int, algorithm=(), ppo=(), lora=True) -> dict:
    return {
        "name": "ppo",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), **({"lora": {"rank": 4, "alpha": 8}} if lora else {})},
        "data": {"kind": "arithmetic", "num_problems": 12, "seed": 1, "max_value": 9},
        "rewards": [VARIED],
        "algorithm": {"name": "ppo", "prompts_per_step": 4, "samples_per_prompt": 1, **dict(algorithm)},
        "ppo": {"critic_lr": 1e-2, **dict(ppo)},
        "rollout": {"max_new_tokens": 10, "num_threads": 1},
        "train": {"steps": steps, "lr": 1e-2, "micro_batch_size": 2, "num_threads": 1},
        "checkpoint": {"every_steps": 1, "keep_last": 1},
        "logging": {"progress": False},
    }


def _kill(ray_session, trainer: OnlineTrainer) -> None:
    for actor in [trainer.learner, trainer.critic, *trainer.pool.workers]:
        ray_session.kill(actor)


def _probe_batch():
    prompts, completions = [[1, 40, 41], [1, 50]], [[60, 61, 62, 2], [70, 2]]
    samples = [
        Sample("p", p, "c", c, [0.0] * len(c), "stop", i)
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    return collate(samples, [0.0, 0.0], pad_token_id=0, max_completion_tokens=4)


def test_ppo_steps_log_critic_metrics_and_resume_with_the_saved_critic(tmp_path, ray_session):
    algorithm = {"kl_coef": 0.05, "kl_in": "reward", "kl_estimator": "k2", "epochs_per_batch": 2, "mini_batches": 2}
    raw = recipe(tmp_path, steps=2, algorithm=algorithm)
    trainer = OnlineTrainer(validate_config(raw))
    probe = _probe_batch()
    try:
        initial = ray_session.get(trainer.critic.values.remote(probe))
        run_dir = trainer.run()
        trained = ray_session.get(trainer.critic.values.remote(probe))
    finally:
        _kill(ray_session, trainer)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = [k for k in PPO_METRICS if row.get(k) is None]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert all(math.isfinite(row[k]) for k in PPO_METRICS), row
        assert row["updates"] == 4 and row["critic/updates"] == 4 and row["critic/value_loss"] > 0
        assert 0 <= row["critic/value_clipfrac"] <= 1 and row["critic/explained_variance"] <= 1
    # LoRA: the policy is the reference until its first update, so step 1's KL penalty is 0 and step 2's is not
    assert rows[0]["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-5) and rows[1]["kl/reward_penalty"] > 0
    assert not torch.allclose(initial, trained)  # the critic learned
    assert {p.name for p in (run_dir / "checkpoints" / "step-2").iterdir()} >= {"learner.pt", "critic.pt"}

    resumed = OnlineTrainer(validate_config({**recipe(tmp_path, steps=3, algorithm=algorithm), "resume": str(run_dir)}))
    try:
        restored = ray_session.get(resumed.critic.values.remote(probe))
        resumed.run()
    finally:
        _kill(ray_session, resumed)
    torch.testing.assert_close(restored, trained, atol=0, rtol=0)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isfinite(rows[-1]["critic/value_loss"])


def test_ppo_with_full_weights_kl_in_the_loss_and_no_value_clip(tmp_path, ray_session):
    raw = recipe(tmp_path, steps=1, algorithm={"kl_coef": 0.05}, ppo={"value_clip": None}, lora=False)
    raw["algorithm"]["samples_per_prompt"] = 2
    trainer = OnlineTrainer(validate_config(raw))
    try:
        run_dir = trainer.run()
    finally:
        _kill(ray_session, trainer)
    (row,) = read_metrics(run_dir)
    assert "kl/reward_penalty" not in row and row["kl"] == pytest.approx(0.0, abs=1e-6)  # KL in the loss: logged
    assert row["critic/value_clipfrac"] == 0 and row["updates"] == 1 and math.isfinite(row["critic/value_loss"])
