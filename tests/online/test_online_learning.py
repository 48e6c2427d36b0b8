"""Every online algorithm must raise the reward on a toy task: a tiny random model (full weights) learning to write
lowercase letters. Measured on 2 cores: each run ~15 s, the reward going from ~0.1 to >= 0.9 within 15 steps."""

from pathlib import Path

import pytest

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

REWARD = {"fn": f"{Path(__file__).parent / 'data' / 'lowercase_reward.py'}:lowercase_fraction"}
ALGORITHMS = {
    "grpo": {"name": "grpo"},
    "dapo": {"name": "grpo", "dynamic_sampling": True, "mini_batches": 2, "dual_clip": 3.0, "eps_high": 0.28},
    "gspo": {
        "name": "grpo",
        "ratio_level": "sequence",
        "eps_low": 3e-4,
        "eps_high": 4e-4,
        "epochs_per_batch": 2,
        "loss_reduction": "seq-mean-token-mean",
    },
    "rloo": {"name": "rloo"},
    "reinforce_pp": {"name": "reinforce_pp", "kl_coef": 0.01, "kl_in": "reward"},
    "reinforce_pp_baseline": {"name": "reinforce_pp_baseline"},
    "rft": {"name": "rft", "rft_keep": "best", "rft_min_reward": None},
    # PPO runs on the same settings; its critic (default LR = train.lr) learns the values alongside the policy
    "ppo": {"name": "ppo", "kl_coef": 0.01, "kl_in": "reward", "epochs_per_batch": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS.values(), ids=ALGORITHMS.keys())
def test_reward_rises_on_a_toy_task(tmp_path, ray_session, algorithm):
    raw = {
        "name": algorithm["name"],
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 32, "seed": 1, "max_value": 9},
        "rewards": [REWARD],
        "algorithm": {"prompts_per_step": 4, "samples_per_prompt": 4, **algorithm},
        "rollout": {"max_new_tokens": 8, "num_threads": 1},
        "train": {"steps": 15, "lr": 1e-2, "micro_batch_size": 16, "num_threads": 1},
        "checkpoint": {"every_steps": 1000},
        "logging": {"progress": False, "samples_per_step": 0},
    }
    trainer = OnlineTrainer(validate_config(raw))
    try:
        rewards = [row["reward/mean"] for row in read_metrics(trainer.run())]
    finally:
        for actor in [trainer.learner, *trainer.pool.workers, *([trainer.critic] if trainer.critic else [])]:
            ray_session.kill(actor)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.25 and last > 0.6, f"reward did not rise: {[round(r, 3) for r in rewards]}"
