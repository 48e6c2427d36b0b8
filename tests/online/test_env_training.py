"""GRPO with an environment (`env:`) end to end on a tiny random model through Ray: episodes are the samples, the
environment's reward their reward, and the learner's loss mask covers the model's own tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

GUESS = Path(__file__).parents[1] / "envs" / "data" / "guess_number.py"


def env_recipe(tmp_path: Path) -> dict:
    return {
        "name": "guess",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic", "num_problems": 6, "seed": 1, "max_value": 4},
        "env": {"path": f"{GUESS}:ShapedGuessNumber", "max_turns": 3, "max_episode_tokens": 160, "args": {"high": 8}},
        "eval": {"data": {"kind": "arithmetic", "num_problems": 2, "seed": 2, "max_value": 4}},
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 3},
        "rollout": {"max_new_tokens": 6, "num_threads": 1},
        "train": {"steps": 2, "lr": 1e-2, "micro_batch_size": 6, "num_threads": 1},
        "logging": {"progress": False, "samples_per_step": 6},
    }


def test_grpo_trains_on_guess_the_number_episodes_with_env_tokens_masked(tmp_path, ray_session):
    trainer = OnlineTrainer(validate_config(env_recipe(tmp_path)))
    rollout = trainer.collect(1)
    assert len(rollout.samples) == 6 and [s.group_id for s in rollout.samples] == [0, 0, 0, 1, 1, 1]
    batch, _ = trainer.policy_batch(rollout)
    P = batch.prompt_width
    for i, sample in enumerate(rollout.samples):
        assert sample.episode["error"] is None and sample.episode["turns"] >= 1
        c = len(sample.completion_token_ids)
        # the learner's mask is the episode's: 1 on the model's ids, 0 on the template's and the environment's
        assert batch.loss_mask_BC[i, :c].tolist() == [float(m) for m in sample.completion_mask]
        assert batch.input_ids_BT[i, P : P + c].tolist() == sample.completion_token_ids
        if sample.episode["turns"] > 1:  # the environment replied at least once: its tokens are in, masked
            assert 0 in sample.completion_mask
        assert rollout.totals[i] == sum(sample.episode["step_rewards"])  # the environment's, per episode
        assert (sample.episode["finish"] == "done") == (rollout.totals[i] >= 1.0)
    assert 0 < batch.loss_mask_BC.sum() < batch.attention_mask_BT[:, P:].sum()
    assert batch.max_completion_tokens == 160  # env.max_episode_tokens: the sample budget, not one turn's

    initial = ray_session.get(trainer.pool.workers[0].get_weights.remote())
    run_dir = trainer.run()
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    evals = [rows[0], rows[2]]  # held-out episodes (greedy, one per row) before training and after the last step
    for row in evals:
        assert row["eval/env/turns/mean"] >= 1 and row["eval/env/failed_episodes"] == 0
        assert row["eval/accuracy"] in (0.0, 0.5, 1.0) and "eval/env/mean" in row
    rows = rows[1:]
    for row in rows:
        assert row["env/failed_episodes"] == 0 and 1 <= row["env/turns/mean"] <= 3
        assert row["env/env_tokens/mean"] > 0 and row["reward/env/count"] == 6
    assert rows[0]["rollout/logprob_diff"] < 1e-4  # engine and learner agree on the model's tokens in their context
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and {"turns", "finish", "error", "step_rewards"} <= set(samples[0])
    assert "<|im_start|>user\nNo, " in "".join(s["completion"] for s in samples)  # the environment's hints
    after = ray_session.get(trainer.pool.workers[0].get_weights.remote())
    assert any(not torch.equal(after[name], initial[name]) for name in initial)  # the learner stepped and synced
