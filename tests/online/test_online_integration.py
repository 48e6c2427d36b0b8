"""Every online algorithm end to end on a tiny random model through Ray (1 rollout worker + 1 learner): a few steps
each, checking the metrics that say the algorithm did what its config asked."""

import math
from pathlib import Path

import pytest
import torch

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

DATA = Path(__file__).parent / "data"
VARIED = {"fn": f"{DATA / 'half_constant_reward.py'}:varied"}
HALF_CONSTANT = {"fn": f"{DATA / 'half_constant_reward.py'}:half_constant"}
ALWAYS = ["loss", "reward/mean", "kl", "entropy", "response_length/mean", "time/generate", "time/train", "updates"]


def recipe(tmp_path: Path, algorithm: dict, rewards=(VARIED,), steps: int = 2) -> dict:
    return {
        "name": algorithm["name"],
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic", "num_problems": 12, "seed": 1, "max_value": 9},
        "rewards": list(rewards),
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 3, **algorithm},
        "rollout": {"max_new_tokens": 10, "num_threads": 1},
        "train": {"steps": steps, "lr": 1e-2, "micro_batch_size": 4, "num_threads": 1},
        "logging": {"progress": False},
    }


def run(raw: dict, ray_session) -> tuple[list[dict], OnlineTrainer]:
    trainer = OnlineTrainer(validate_config(raw))
    try:
        run_dir = trainer.run()
        return read_metrics(run_dir)[-raw["train"]["steps"] :], trainer
    finally:
        for actor in [trainer.learner, *trainer.pool.workers]:
            ray_session.kill(actor)


def _check_common(rows: list[dict], steps: int = 2) -> None:
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        missing = [k for k in ALWAYS if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"


def test_grpo_dapo_gspo_variants(tmp_path, ray_session):
    algorithm = {
        "name": "grpo",
        "dynamic_sampling": True,
        "max_refill_rounds": 2,
        "mini_batches": 2,
        "ratio_level": "sequence",
        "eps_low": 3e-4,
        "eps_high": 4e-4,
        "dual_clip": 3.0,
        "kl_coef": 0.05,
        "kl_in": "reward",
        "kl_estimator": "k1",
        "loss_reduction": "seq-mean-token-mean",
    }
    rows, _ = run(recipe(tmp_path, algorithm, rewards=(HALF_CONSTANT,)), ray_session)
    _check_common(rows)
    for row in rows:
        assert row["dynamic_sampling/generated_groups"] == 2 * (1 + row["dynamic_sampling/extra_rounds"])
        assert row["dynamic_sampling/kept_groups"] <= 2 and math.isfinite(row["kl/reward_penalty"])
        if row["dynamic_sampling/kept_groups"]:
            assert row["updates"] == 2 and "dual_clip_fraction" in row and "clip_fraction" in row
    refilled = [r for r in rows if r["dynamic_sampling/extra_rounds"] > 0]
    assert refilled, "the half-constant reward should have left a step short of informative groups"
    # the penalty is taken before the step's first update: at step 1 the LoRA policy is still the reference
    assert rows[0]["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-5) and math.isfinite(rows[0]["kl"])


def test_dynamic_sampling_with_no_informative_group_skips_the_update(tmp_path, ray_session):
    constant = {"fn": "math_accuracy"}  # a random tiny model never answers: every group scores all zeros
    algorithm = {"name": "rloo", "dynamic_sampling": True, "max_refill_rounds": 1}
    trainer_rows, trainer = run(recipe(tmp_path, algorithm, rewards=(constant,), steps=1), ray_session)
    (row,) = trainer_rows
    assert row["updates"] == 0 and row["loss"] is None and row["dynamic_sampling/kept_groups"] == 0
    assert row["dynamic_sampling/extra_rounds"] == 1 and row["zero_variance_groups"] == 1.0


@pytest.mark.parametrize(
    "algorithm",
    [
        {"name": "rloo", "kl_coef": 0.05, "kl_estimator": "k2"},
        {"name": "reinforce_pp", "samples_per_prompt": 1, "kl_coef": 0.05, "kl_in": "reward", "kl_estimator": "k3"},
        {"name": "reinforce_pp_baseline", "kl_coef": 0.05, "kl_in": "reward", "epochs_per_batch": 2},
    ],
    ids=lambda a: a["name"],
)
def test_rloo_and_reinforce_pp(tmp_path, ray_session, algorithm):
    rows, _ = run(recipe(tmp_path, algorithm), ray_session)
    _check_common(rows)
    updates = algorithm.get("epochs_per_batch", 1)
    assert all(r["updates"] == updates and r["grad_norm"] > 0 for r in rows)
    # LoRA starts at B = 0, so the policy is the reference until the first update (the KL logged by a second
    # update of the same step, and the penalty of step 2, see a moved policy)
    if updates == 1:
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert rows[-1]["kl"] > 0
    if algorithm.get("kl_in") == "reward":
        assert rows[0]["kl/reward_penalty"] == pytest.approx(0.0, abs=1e-5) and rows[1]["kl/reward_penalty"] > 0
    else:
        assert "kl/reward_penalty" not in rows[0]


def test_online_rft_takes_sft_steps_on_the_kept_samples(tmp_path, ray_session):
    algorithm = {"name": "rft", "rft_keep": "all", "rft_min_reward": 0.25}
    rows, trainer = run(recipe(tmp_path, algorithm), ray_session)
    _check_common(rows)
    for row in rows:
        assert 0 < row["rft/kept_samples"] <= 6 and row["rft/kept_fraction"] == row["rft/kept_samples"] / 6
        assert row["nll"] > 0 and row["loss"] == pytest.approx(row["sft_loss"]) and "ratio/min" not in row


def test_online_rft_keeps_nothing_below_the_threshold_and_leaves_the_weights(tmp_path, ray_session):
    algorithm = {"name": "rft", "rft_keep": "best", "rft_min_reward": 2.0}  # the reward is at most 0.9
    raw = recipe(tmp_path, algorithm, steps=1)
    trainer = OnlineTrainer(validate_config(raw))
    try:
        before = ray_session.get(trainer.learner.get_weights.remote(False))
        run_dir = trainer.run()
        after = ray_session.get(trainer.learner.get_weights.remote(False))
    finally:
        for actor in [trainer.learner, *trainer.pool.workers]:
            ray_session.kill(actor)
    (row,) = read_metrics(run_dir)
    assert row["rft/kept_samples"] == 0 and row["updates"] == 0
    assert all(torch.equal(before[name], after[name]) for name in before)
