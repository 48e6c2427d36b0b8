"""The distill pipeline end to end on tiny random models: teacher traces through Ray, then student SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import ConfigError, validate_config
from posttrain.distill.pipeline import run_distill
from posttrain.models.tiny import tiny_model_path

LENGTH_REWARD = Path(__file__).parent.parent / "online" / "data" / "length_reward.py"


def distill_recipe(tmp_path: Path, **overrides) -> dict:
    recipe = {
        "name": "distill",
        "output_dir": str(tmp_path / "runs"),
        "model": {"path": str(tiny_model_path(seed=1))},
        "data": {"kind": "arithmetic", "num_problems": 5, "seed": 1, "max_value": 9},
        "eval": {"data": {"kind": "arithmetic", "num_problems": 3, "seed": 2, "max_value": 9}},
        "rewards": [{"fn": "math_accuracy"}, {"fn": f"{LENGTH_REWARD}:length_reward", "weight": 0.01}],
        "algorithm": {"name": "distill"},
        "traces": {
            "teacher": str(tiny_model_path(seed=0)),
            "samples_per_prompt": 3,
            "keep": "best",
            "min_reward": None,
            "chunk_problems": 2,
            "drop_truncated": False,
        },
        "rollout": {"max_new_tokens": 8, "num_threads": 1},
        "train": {"steps": 2, "lr": 1e-3, "batch_size": 2, "micro_batch_size": 2, "num_threads": 1},
        "logging": {"progress": False},
    }
    for key, value in overrides.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    return recipe


def test_distill_writes_traces_trains_the_student_and_reports(tmp_path, ray_session):
    run_dir = run_distill(validate_config(distill_recipe(tmp_path)))
    rows = [json.loads(line) for line in (run_dir / "traces.jsonl").read_text().splitlines()]
    assert [r["problem"] for r in rows] == [0, 1, 2, 3, 4]  # best-of-3 for each of the 5 problems
    assert all(r["source"] == str(tiny_model_path(seed=0)) and "answer" in r for r in rows)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["traces"]["generated"] == 15 and report["traces"]["kept"] == 5
    assert report["traces"]["generated_tokens"] >= report["traces"]["kept_tokens"] > 0
    student = Path(report["student"])
    assert (student / "config.json").is_file() and student.parent.parent == run_dir
    assert set(report["eval_before"]) >= {"eval/accuracy"} and set(report["eval_after"]) >= {"eval/accuracy"}
    # resuming a finished run generates nothing new and does not train again
    again = run_distill(validate_config(distill_recipe(tmp_path, resume=str(run_dir))))
    assert again == run_dir
    assert len((run_dir / "traces.jsonl").read_text().splitlines()) == 5


def test_distill_recipes_are_checked_before_any_work(tmp_path):
    recipe = distill_recipe(tmp_path)
    recipe["traces"] = {**recipe["traces"], "teacher": None}
    with pytest.raises(ConfigError, match="traces.teacher: algorithm.name=distill needs the teacher"):
        validate_config(recipe)
    recipe["algorithm"] = {"name": "rft_offline"}
    recipe["traces"]["teacher"] = "some/model"
    with pytest.raises(ConfigError, match="rft_offline samples the model itself"):
        validate_config(recipe)
    recipe = distill_recipe(tmp_path, rewards=[])
    with pytest.raises(ConfigError, match="needs at least one reward"):
        validate_config(recipe)
