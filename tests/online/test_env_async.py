"""Environments in async mode (`env` with `rollout.async_mode`): step t+1's episodes, every turn of them, run while
step t trains, one step stale as completions are; their failures still end their own episode, named, or the run."""

from __future__ import annotations

import json
import math
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest

from posttrain.algorithms.registry import readers
from posttrain.config import validate_config
from posttrain.data.sources import batch_indices
from posttrain.envs import load_environment
from posttrain.models.tiny import tiny_model_path
from posttrain.online.env_rollout import EpisodeFailed
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

ENVS = Path(__file__).parents[1] / "envs" / "data"
SCRIPTED = load_environment(f"{ENVS / 'scripted.py'}:Scripted")  # as the trainer loads it: the same module
RELEASE = sys.modules[SCRIPTED.func.__module__].RELEASE  # lets a hanging step return once the test is done


def recipe(tmp_path: Path, env: dict, steps: int, **extra) -> dict:
    return {
        "name": "env-async",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 6, "seed": 1, "max_value": 4},
        "env": {"max_turns": 3, "max_episode_tokens": 160, **env},
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 3, "tis_cap": 2.0},
        "rollout": {"max_new_tokens": 6, "num_threads": 1, "async_mode": True},
        "train": {"steps": steps, "lr": 1e-2, "micro_batch_size": 6, "num_threads": 1},
        "logging": {"progress": False, "samples_per_step": 6},
        **extra,
    }


def scripted_rows(tmp_path: Path, modes: list[str]) -> dict:
    """`data:` reading one row per mode (`Scripted` misbehaves as its row's `mode` says)."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": "p", "mode": mode}) + "\n" for mode in modes))
    return {"kind": "file", "path": str(path)}


def _kill_actors(ray_session, trainer: OnlineTrainer) -> None:
    """Free the shared Ray session's CPUs for the next test."""
    for actor in [trainer.learner, *trainer.pool.workers]:
        ray_session.kill(actor)


def test_env_recipes_take_async_mode_for_every_algorithm_that_reads_env(tmp_path):
    for name in readers("env"):
        raw = recipe(tmp_path, {"path": f"{ENVS / 'guess_number.py'}:GuessNumber"}, steps=1)
        cfg = validate_config({**raw, "algorithm": {"name": name, "prompts_per_step": 2, "samples_per_prompt": 2}})
        assert cfg.rollout.async_mode and cfg.env.path.endswith(":GuessNumber")


def test_weights_do_not_sync_under_a_rollout_still_generating():
    trainer = OnlineTrainer.__new__(OnlineTrainer)  # the check runs before anything the constructor starts
    trainer._next = Future()  # the next step's episodes, not finished
    with pytest.raises(RuntimeError, match="still generating: its samples .every turn of an episode. must come"):
        trainer._sync_weights()


def test_async_grpo_on_episodes_is_one_step_stale_with_the_completions_metrics(tmp_path, ray_session):
    env = {"path": f"{ENVS / 'guess_number.py'}:ShapedGuessNumber", "args": {"high": 8}}
    raw = recipe(tmp_path, env, steps=3, model={"path": str(tiny_model_path()), "lora": {"rank": 4, "alpha": 8}})
    trainer = OnlineTrainer(validate_config(raw))
    try:
        run_dir = trainer.run()
    finally:
        _kill_actors(ray_session, trainer)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # as for completions (tests/online/test_async_mode.py): step t >= 2's episodes ran while step t - 1 trained, all
    # their turns with the weights after step t - 2
    assert [r["rollout/policy_version"] for r in rows] == [0, 0, 1]
    assert [r["async/staleness"] for r in rows] == [0, 1, 1]
    assert all(r["time/overlap"] > 0 and r["time/wait_rollout"] >= 0 for r in rows[:2])
    assert "time/overlap" not in rows[2]  # the last step starts no further generation
    for row in rows:
        assert row["env/failed_episodes"] == 0 and 1 <= row["env/turns/mean"] <= 3 and row["env/env_tokens/mean"] > 0
        assert row["reward/env/count"] == 6 and math.isfinite(row["loss"]) and row["updates"] == 1
        assert sum(v for k, v in row.items() if k.startswith("env/finish/")) == pytest.approx(1.0)
        # TIS against the sampler's log-probs of the model's tokens (the environment's carry no loss): one update
        # per batch, so lp_old is the learner's log-prob and the TIS log-ratio is the logged sampler gap
        assert row["tis/log_ratio_abs_mean"] == pytest.approx(row["rollout/logprob_diff"], rel=1e-5)
        assert 0 < row["tis/weight_mean"] <= 2.0
    assert rows[0]["rollout/logprob_diff"] < 1e-4  # sampled with the learner's own weights
    # one update stale: the learner scores the episodes with weights the sampler did not have
    assert all(r["rollout/logprob_diff"] > 1e-3 for r in rows[1:])
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 18 and all(s["error"] is None and s["turns"] >= 1 for s in samples)


def test_a_failed_episode_of_the_step_generated_during_training_stops_the_run_naming_that_step(tmp_path, ray_session):
    seed = 0
    first, second = batch_indices(4, 2, 0, seed), batch_indices(4, 2, 1, seed)
    assert not set(first) & set(second)
    modes = ["raises" if i in second else "ok" for i in range(4)]  # only step 2's episodes fail
    env = {"path": f"{ENVS / 'scripted.py'}:Scripted", "on_error": "raise"}
    raw = recipe(tmp_path, env, steps=3, data=scripted_rows(tmp_path, modes), seed=seed)
    trainer = OnlineTrainer(validate_config(raw))
    try:
        with pytest.raises(EpisodeFailed, match=r"data row \d of step 2\) failed: env_raised: Scripted.step raised"):
            trainer.run()
    finally:
        _kill_actors(ray_session, trainer)
    # it surfaced while step 1 trained, before the weights synced; step 1 was not logged as done
    failed = (trainer.run_dir / "FAILED").read_text()
    assert failed.startswith("step 1: posttrain.online.env_rollout.EpisodeFailed: episode ") and "of step 2)" in failed
    assert read_metrics(trainer.run_dir) == []


def test_a_hanging_step_in_an_async_rollout_times_out_named_and_the_run_goes_on(tmp_path, ray_session):
    RELEASE.clear()  # another test may have released the hanging steps for good
    env = {"path": f"{ENVS / 'scripted.py'}:Scripted", "step_timeout": 1.0}
    raw = recipe(tmp_path, env, steps=2, data=scripted_rows(tmp_path, ["ok", "hangs"]))
    trainer = OnlineTrainer(validate_config(raw))
    try:
        run_dir = trainer.run()
    finally:
        RELEASE.set()
        _kill_actors(ray_session, trainer)
    rows = read_metrics(run_dir)
    assert [r["async/staleness"] for r in rows] == [0, 1]  # step 2's episodes ran in the background
    for row in rows:  # the 3 episodes of the hanging row fail by name and get no loss; the others finish
        assert row["env/errors/env_timeout"] == 3 and row["env/failed_episodes"] == 3 and row["skipped_samples"] == 3
        assert row["env/finish/done"] == 0.5 and row["reward/env/count"] == 3
    errors = [json.loads(line)["error"] for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert errors.count("env_timeout: Scripted.step did not return within 1 s") == 6
