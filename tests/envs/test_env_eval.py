"""Held-out evaluation of episodes (`eval.data` with `env.path`): the eval rows' episodes run through the training's
episode runner; an episode is correct when the environment's reward is >= 1, a failed one is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import validate_config
from posttrain.models.tiny import tiny_model_path
from posttrain.online.env_rollout import EnvRollout, EpisodeFailed
from posttrain.online.evaluation import eval_params, evaluate_episodes, evaluate_recipe
from posttrain.rollout.hf_engine import HFEngine

GRADED = Path(__file__).parent / "data" / "scripted.py"
ROWS = [{"prompt": "p", "answer": answer} for answer in ("yes", "no", "boom", "yes")]


def recipe(tmp_path: Path, **env) -> dict:
    return {
        "output_dir": str(tmp_path),
        "model": {"path": str(tiny_model_path())},
        "data": {"kind": "file", "path": str(tmp_path / "rows.jsonl")},
        "env": {"path": f"{GRADED}:Graded", "max_turns": 3, **env},
        "eval": {"data": {"kind": "file", "path": str(tmp_path / "rows.jsonl")}, "n": 2, "temperature": 1.0},
        "rollout": {"max_new_tokens": 5, "num_threads": 1},
    }


def write_rows(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))


def test_eval_episodes_give_accuracy_pass_at_k_and_episode_metrics(tmp_path):
    write_rows(tmp_path)
    cfg = validate_config(recipe(tmp_path))
    engine = HFEngine(str(tiny_model_path()), num_threads=1)
    params = eval_params(2, 1.0, 5, [], seed=3)
    metrics, records = evaluate_episodes(EnvRollout(cfg, engine.tokenizer), engine, ROWS, params)
    # 2 episodes per row, row-major: yes yes | no no | boom boom (failed) | yes yes
    assert [r["correct"] for r in records] == [True, True, False, False, False, False, True, True]
    assert metrics["eval/accuracy"] == 0.5 and metrics["eval/pass@2"] == 0.5
    assert metrics["eval/env/mean"] == pytest.approx(4 / 6)  # the failed episodes have no reward
    assert metrics["eval/env/failed_episodes"] == 2 and metrics["eval/env/errors/env_raised"] == 2
    assert metrics["eval/env/turns/mean"] == pytest.approx((6 * 2 + 2 * 1) / 8)
    assert records[4]["error"] == "env_raised: Graded.step raised RuntimeError('grader down')"
    assert (records[0]["turns"], records[0]["finish"], records[0]["reward"]) == (2, "done", 1.0)
    with pytest.raises(EpisodeFailed, match="data row 2 of this step"):
        raising = validate_config(recipe(tmp_path, on_error="raise"))
        evaluate_episodes(EnvRollout(raising, engine.tokenizer), engine, ROWS, params)


def test_posttrain_evals_episodes_of_a_recipe_with_an_env(tmp_path):
    write_rows(tmp_path)
    result = evaluate_recipe(validate_config(recipe(tmp_path)))
    assert (result["num_prompts"], result["n"], len(result["samples"])) == (4, 2, 8)
    assert result["metrics"]["eval/accuracy"] == 0.5 and result["metrics"]["eval/env/failed_episodes"] == 2
