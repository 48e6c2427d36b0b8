"""GRPO end to end on a tiny random model through Ray: 1 rollout worker + 1 learner."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from posttrain.config import validate_config
from posttrain.data.sources import arithmetic_rows, batch_indices
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import GRPOTrainer
from posttrain.rewards.loading import RewardLoadError
from posttrain.run_folder.run_dir import read_metrics

REWARD_FILE = Path(__file__).parent / "data" / "length_reward.py"
REQUIRED = [
    "step",
    "loss",
    "reward/mean",
    "kl",
    "entropy",
    "response_length/mean",
    "time/generate",
    "time/train",
    "time/sync",
]


def tiny_recipe(tmp_path: Path, **overrides) -> dict:
    recipe = {
        "name": "tiny",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}},
        "data": {"kind": "arithmetic", "num_problems": 12, "seed": 1, "max_value": 9},
        "eval": {"data": {"kind": "arithmetic", "num_problems": 4, "seed": 2, "max_value": 9}},
        "rewards": [{"fn": f"{REWARD_FILE}:length_reward"}, {"fn": "math_accuracy", "weight": 1.0}],
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 3, "kl_coef": 0.05},
        "rollout": {"max_new_tokens": 12, "num_threads": 1},
        "train": {"steps": 3, "lr": 1e-2, "micro_batch_size": 4, "num_threads": 1},
        "checkpoint": {"every_steps": 2},
        "logging": {"progress": False, "samples_per_step": 6},
    }
    for key, value in overrides.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    return recipe


def test_three_grpo_steps_log_metrics_and_sync_weights(tmp_path, ray_session):
    trainer = GRPOTrainer(validate_config(tiny_recipe(tmp_path)))
    initial = ray_session.get(trainer.pool.workers[0].get_weights.remote())
    run_dir = trainer.run()

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows[0]) >= {"eval/accuracy", "time/eval"}  # before training
    for row in rows[1:]:
        missing = [k for k in REQUIRED if k not in row]
        assert not missing, f"step {row['step']} lacks {missing}"
        assert row["kl"] is not None and row["kl"] >= 0 and row["entropy"] > 0
        assert row["response_length/mean"] > 0 and row["time/generate"] > 0
    assert "eval/accuracy" in rows[-1] and "eval/accuracy" not in rows[1]
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # adapter starts at B = 0: policy == reference
    assert rows[1]["rollout/logprob_diff"] < 1e-4  # engine and learner agree on the same weights

    # after the last sync the rollout worker holds exactly the learner's (merged) weights, and they moved
    learner_w = ray_session.get(trainer.learner.get_weights.remote(False))
    worker_w = ray_session.get(trainer.pool.workers[0].get_weights.remote())
    assert learner_w.keys() == worker_w.keys()
    for name, tensor in learner_w.items():
        torch.testing.assert_close(worker_w[name], tensor, rtol=0, atol=0, msg=name)
    moved = [n for n in learner_w if not torch.equal(learner_w[n], initial[n])]
    assert moved and all("proj" in n for n in moved)  # LoRA: only the adapted projections change

    assert {p.name for p in run_dir.iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "tensorboard",
        "checkpoints",
        "final",
        "curves.png",
    }
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-3"]
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    torch.testing.assert_close(
        final.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        learner_w["model.layers.0.self_attn.q_proj.weight"],
    )


def _run_cli(args, **kwargs):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


@pytest.mark.heavy  # two `posttrain train` subprocesses
def test_sigkill_mid_run_then_resume_repeats_and_skips_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"steps": 6}, checkpoint={"every_steps": 2})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = _run_cli(["train", str(path)])
    runs = tmp_path / "runs"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until step 3 is logged: checkpoint 2 exists, step 4 is under way
        metrics = next(runs.glob("tiny-*/metrics.jsonl"), None) if runs.exists() else None
        if metrics and any(r["step"] == 3 for r in read_metrics(metrics.parent)):
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    else:
        pytest.fail("the run did not reach step 3 in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started (Ray included)
    proc.wait()
    run_dir = metrics.parent
    assert max(r["step"] for r in read_metrics(run_dir)) < 6

    resumed = _run_cli(["train", str(path), f"resume={run_dir}"])
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert re.search(r"resuming .* from step-[24] ", out), out

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(7))  # every step exactly once, ending at step 6
    train_rows = arithmetic_rows(validate_config(recipe).data)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for step in range(1, 7):
        expected = {train_rows[i]["prompt"] for i in batch_indices(len(train_rows), 2, step - 1, seed=0)}
        assert {s["prompt"] for s in samples if s["step"] == step} == expected, f"step {step}"
    assert (run_dir / "final" / "config.json").exists()


def test_a_column_a_reward_needs_is_missing_before_any_folder_actor_or_generation(tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text('{"prompt": "What is 2 + 2?", "gold": "4"}\n')
    recipe = {**tiny_recipe(tmp_path, eval={"data": None}), "data": {"kind": "file", "path": str(data)}}
    with pytest.raises(RewardLoadError, match=r"'math_accuracy' needs the dataset column `answer` or `solution`"):
        GRPOTrainer(validate_config(recipe))
    assert not (tmp_path / "runs").exists()


def test_a_step_where_every_group_scored_alike_is_said_once_per_streak(tmp_path, ray_session, capfd):
    # `format` on the random tiny model: no completion has a final-answer marker, every sample scores 0
    recipe = tiny_recipe(tmp_path, rewards=[{"fn": "format"}], eval={"data": None}, train={"steps": 2})
    run_dir = GRPOTrainer(validate_config(recipe)).run()
    err = capfd.readouterr().err
    assert [r["zero_variance_groups"] for r in read_metrics(run_dir)] == [1.0, 1.0]
    assert "step 1: every group has zero reward variance (all samples of each prompt scored alike): no learning" in err
    assert err.count("every group has zero reward variance") == 1
