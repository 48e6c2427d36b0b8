"""Async mode (`rollout.async_mode`): step t+1's batch is generated while step t trains, exactly one step stale."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.trainer import OnlineTrainer
from posttrain.run_folder.run_dir import read_metrics

LENGTH_REWARD = Path(__file__).parent / "data" / "length_reward.py"


def _recipe(tmp_path: Path, async_mode: bool, steps: int, **extra) -> dict:
    return {
        "name": "async" if async_mode else "sync",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "arithmetic", "num_problems": 12, "seed": 1, "max_value": 9},
        "rewards": [{"fn": f"{LENGTH_REWARD}:length_reward"}],
        "algorithm": {"prompts_per_step": 2, "samples_per_prompt": 2, "tis_cap": 2.0},
        "rollout": {"max_new_tokens": 8, "num_threads": 1, "async_mode": async_mode},
        "train": {"steps": steps, "lr": 1e-2, "micro_batch_size": 4, "num_threads": 1},
        "checkpoint": {"every_steps": 1},
        "scoring": {"workers": 0},
        "logging": {"progress": False},
        **extra,
    }


def _column(rows: list[dict], key: str) -> list:
    return [row.get(key) for row in rows if row["step"] > 0]


def test_async_runs_one_step_stale_with_tis_and_overlap(tmp_path, ray_session):
    run_dir = OnlineTrainer(validate_config(_recipe(tmp_path, True, steps=3))).run()
    rows = read_metrics(run_dir)
    assert _column(rows, "step") == [1, 2, 3]
    # step 1's batch comes from the initial weights (nothing to overlap yet); step t >= 2's was generated while step
    # t - 1 trained, i.e. with the weights after step t - 2: version t - 2, one update behind the learner's t - 1
    assert _column(rows, "rollout/policy_version") == [0, 0, 1]
    assert _column(rows, "async/staleness") == [0, 1, 1]
    overlap = _column(rows, "time/overlap")
    assert all(o is not None and o > 0 for o in overlap[:2])  # the next batch's generation ran during training
    assert overlap[2] is None  # the last step starts no further generation
    assert all(w is not None and w >= 0 for w in _column(rows, "time/wait_rollout")[:2])
    # TIS is on: weights were computed against the sampler's log-probs every step
    assert all(0 < w <= 2.0 for w in _column(rows, "tis/weight_mean"))
    assert all(v is not None for v in _column(rows, "loss"))


def test_sync_mode_is_never_stale(tmp_path, ray_session):
    run_dir = OnlineTrainer(validate_config(_recipe(tmp_path, False, steps=2))).run()
    rows = read_metrics(run_dir)
    assert _column(rows, "rollout/policy_version") == [0, 1]
    assert _column(rows, "async/staleness") == [0, 0]
    assert _column(rows, "time/overlap") == [None, None]


def test_async_run_resumes_from_a_checkpoint(tmp_path, ray_session):
    run_dir = OnlineTrainer(validate_config(_recipe(tmp_path, True, steps=2))).run()
    resumed = OnlineTrainer(validate_config(_recipe(tmp_path, True, steps=4, resume=str(run_dir))))
    assert resumed.start_step == 2 and resumed.policy_version == resumed.rollout_version == 2
    assert resumed.run() == run_dir
    rows = read_metrics(run_dir)
    assert _column(rows, "step") == [1, 2, 3, 4]
    # after a resume the first batch is generated with the checkpoint's weights (no pending batch survives a
    # restart), then the one-step lag resumes
    assert _column(rows, "rollout/policy_version") == [0, 0, 2, 2]
    assert _column(rows, "async/staleness") == [0, 1, 0, 1]
    assert (run_dir / "checkpoints" / "step-4").is_dir() and (run_dir / "final").is_dir()
