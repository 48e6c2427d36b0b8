"""GRPO and PPO with an environment (`env:`) end to end on a tiny random model through Ray: episodes are the samples,
the environment's reward their reward, and the learner's loss mask (and PPO's GAE steps) cover the model's own tokens
only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.ppo import ppo_batch
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


def test_grpo_on_episodes_adds_the_weighted_rewards_of_each_transcript_to_the_environments(tmp_path, ray_session):
    raw = env_recipe(tmp_path)
    reward = Path(__file__).parent / "data" / "transcript_reward.py"
    raw["rewards"] = [{"fn": f"{reward}:transcript_reward", "weight": 0.5}]  # scored on a reward worker actor
    raw["train"]["steps"] = 1
    del raw["eval"]
    trainer = OnlineTrainer(validate_config(raw))
    try:
        rollout = trainer.collect(1)
        scores = rollout.scores
        for i, sample in enumerate(rollout.samples):
            # the reward saw the transcript: one assistant message per model turn, reset's one message as the prompt
            judged = sample.episode["turns"] / 10 + 1 / 100
            assert scores.per_function["transcript_reward"][i] == pytest.approx(judged, abs=1e-12)
            assert scores.per_function["env"][i] == sum(sample.episode["step_rewards"])
            assert rollout.totals[i] == pytest.approx(sum(sample.episode["step_rewards"]) + 0.5 * judged, abs=1e-12)
        run_dir = trainer.run()
    finally:
        _kill_actors(ray_session, trainer)
    (row,) = read_metrics(run_dir)
    assert row["reward/env/count"] == 6 and row["reward/transcript_reward/count"] == 6 and row["skipped_samples"] == 0
    judged_mean, env_mean = row["reward/transcript_reward/mean"], row["reward/env/mean"]
    assert row["reward/mean"] == pytest.approx(env_mean + 0.5 * judged_mean, abs=1e-9)
    assert 0.11 <= judged_mean <= 0.31 and row["time/reward"] > 0


def _env_rows(run_dir: Path) -> list[dict]:
    """The two steps' metrics; every episode ran (none failed) and the environment replied in some."""
    rows = [row for row in read_metrics(run_dir) if row["step"] > 0]  # step 0: the evaluation before training
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["env/failed_episodes"] == 0 and row["env/env_tokens/mean"] > 0 and row["env/turns/mean"] >= 1
    return rows


def _kill_actors(ray_session, trainer: OnlineTrainer) -> None:
    """Free the shared Ray session's CPUs for the next test."""
    for actor in [trainer.learner, trainer.critic, *trainer.pool.workers]:
        if actor is not None:
            ray_session.kill(actor)


def _reply_between_turns(mask: list[int]) -> bool:
    """Whether a 0 (the environment's or the template's token) sits between two of the model's tokens."""
    model = [t for t, m in enumerate(mask) if m]
    return bool(model) and 0 in mask[model[0] : model[-1]]


def test_ppo_trains_on_episodes_with_gae_over_the_model_tokens_only(tmp_path, ray_session):
    raw = env_recipe(tmp_path)
    raw["algorithm"] = {"name": "ppo", "prompts_per_step": 3, "samples_per_prompt": 2}
    raw["ppo"] = {"critic_lr": 1e-2, "gamma": 1.0, "lam": 1.0}  # lam 1, no KL: every step's return is the score
    trainer = OnlineTrainer(validate_config(raw))
    try:
        rollout = trainer.collect(1)
        pad_id = trainer.format.tokenizer.pad_token_id
        batch, _ = ppo_batch(trainer.cfg, rollout.samples, rollout.totals, pad_id, trainer.learner, trainer.critic)
        mask_BC = batch.loss_mask_BC.bool()
        assert batch.max_completion_tokens == 160  # env.max_episode_tokens
        assert any(_reply_between_turns(s.completion_mask) for s in rollout.samples)  # GAE has a gap to skip
        for i, sample in enumerate(rollout.samples):
            model_tokens = mask_BC[i].nonzero().flatten()
            # gamma = lam = 1 and no KL: the return of every model token is the episode's reward, also on the turns
            # before an environment's reply (GAE bootstraps over the reply instead of ending the episode there)
            expected = torch.full((len(model_tokens),), rollout.totals[i])
            torch.testing.assert_close(batch.returns_BC[i, model_tokens], expected, atol=1e-5, rtol=0)
            assert sample.episode["turns"] >= 1 and len(model_tokens) == sum(sample.completion_mask)
        # the environment's tokens and the padding carry no value, return or advantage
        for name in ("old_values_BC", "returns_BC", "token_advantages_BC"):
            assert not getattr(batch, name)[~mask_BC].any(), name
        assert batch.old_values_BC[mask_BC].abs().sum() > 0  # the critic valued the model's tokens
        run_dir = trainer.run()
    finally:
        _kill_actors(ray_session, trainer)
    rows = _env_rows(run_dir)
    for row in rows:
        assert (
            row["reward/env/count"] == 6
            and row["critic/updates"] >= 1
            and math.isfinite(row["critic/value_loss"])
            and row["updates"] >= 1
        )
        assert math.isfinite(row["ppo/returns_mean"]) and math.isfinite(row["loss"])
    assert rows[0]["rollout/logprob_diff"] < 1e-4
    assert {p.name for p in (run_dir / "checkpoints" / "step-2").iterdir()} >= {"learner.pt", "critic.pt"}


@pytest.mark.slow  # ~2 min on 2 shared cores (vLLM starts in a Ray actor)
def test_grpo_on_episodes_with_vllm_rollouts(tmp_path, ray_session):
    raw = env_recipe(tmp_path)
    raw["model"]["path"] = str(tiny_model_path(num_heads=2))  # vLLM's CPU attention needs a head size of at least 32
    raw["rollout"]["engine"] = "vllm"
    run_dir = OnlineTrainer(validate_config(raw)).run()
    rows = _env_rows(run_dir)
    for row in rows:
        # the learner scores vLLM's ids in their context as vLLM did; step 2's come from the weights synced after step 1
        assert row["rollout/logprob_diff"] < 1e-4
    assert rows[1]["time/sync"] > 0


def test_online_rft_keeps_the_best_episode_of_each_row_and_trains_on_its_model_tokens(tmp_path, ray_session):
    raw = env_recipe(tmp_path)
    raw["algorithm"] = {"name": "rft", "prompts_per_step": 2, "samples_per_prompt": 3, "rft_min_reward": None}
    trainer = OnlineTrainer(validate_config(raw))
    try:
        rollout = trainer.collect(1)
        batch, metrics = trainer.rft_batch(rollout)
        assert metrics["rft/kept_samples"] == 2 and batch.max_completion_tokens == 160
        for k, g in enumerate((0, 1)):  # the kept episode of each row is its best
            totals = rollout.totals[3 * g : 3 * g + 3]
            best = rollout.samples[3 * g + totals.index(max(totals))]
            c = len(best.completion_token_ids)
            P = batch.prompt_width
            assert batch.input_ids_BT[k, P : P + c].tolist() == best.completion_token_ids
            # the SFT loss covers the model's tokens only, not the environment's replies
            assert batch.loss_mask_BC[k, :c].tolist() == [float(m) for m in best.completion_mask]
        initial = ray_session.get(trainer.learner.get_weights.remote(False))
        run_dir = trainer.run()
        after = ray_session.get(trainer.learner.get_weights.remote(False))
    finally:
        _kill_actors(ray_session, trainer)
    for row in _env_rows(run_dir):
        assert row["rft/kept_samples"] == 2 and row["updates"] == 1 and row["nll"] > 0
    assert any(not torch.equal(after[name], initial[name]) for name in initial)
