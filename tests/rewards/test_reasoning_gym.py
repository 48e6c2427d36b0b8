"""The `reasoning_gym` reward through the normal reward path (named in a recipe, loaded, combined): the task's own
checker gives 1.0 for the dataset's answer and 0.0 (or its partial credit) for a wrong one, from rows that went
through JSON."""

import json

import pytest

from posttrain.config import ReasoningGymSource
from posttrain.data.sources import load_rows
from posttrain.rewards.combine import RewardError, score_samples
from posttrain.rewards.loading import build_reward_specs, check_columns

pytest.importorskip("reasoning_gym", reason="pip install reasoning-gym==0.1.25 (the `test` and `envs` extras)")


def scored(rows, completions, on_error="raise"):
    specs = build_reward_specs([{"fn": "reasoning_gym"}, {"fn": "format", "weight": 0.0}], ["rg", "format"])
    check_columns(specs, rows, "data")
    columns = {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}
    return score_samples(specs, [row["prompt"] for row in rows], completions, columns, on_error=on_error)


@pytest.mark.parametrize("task", ["basic_arithmetic", "chain_sum", "countdown"])
def test_the_datasets_answer_scores_one_and_a_wrong_one_does_not(task):
    rows = json.loads(json.dumps(load_rows(ReasoningGymSource(task=task, size=4, seed=3))))  # as from a JSONL file
    right = [f"Let me think.\n<answer>{row['answer']}</answer>" for row in rows]
    assert scored(rows, right).per_function["rg"] == [1.0] * 4
    wrong = ["<answer>123456789</answer>"] * 4
    no_tag = [row["answer"] for row in rows]  # the right answer, but not where the instruction asked for it
    partial = {"countdown": (0.05, 0.01)}.get(task, (0.0, 0.0))  # countdown's format credits
    assert scored(rows, wrong).per_function["rg"] == [partial[0]] * 4
    assert scored(rows, no_tag).per_function["rg"] == [partial[1]] * 4
    chat = [[{"role": "assistant", "content": text}] for text in right]  # conversational completions
    assert scored(rows, chat).total == [1.0] * 4


def test_the_whole_completion_is_the_answer_with_tag_none():
    rows = load_rows(ReasoningGymSource(task="chain_sum", size=2, seed=1))
    specs = build_reward_specs([{"fn": "reasoning_gym", "args": {"tag": None}}], ["rg"])
    columns = {"reasoning_gym": [row["reasoning_gym"] for row in rows]}
    completions = [f" {rows[0]['answer']}\n", f"<answer>{rows[1]['answer']}</answer>"]
    import reasoning_gym

    dataset = reasoning_gym.create_dataset("chain_sum", size=2, seed=1)
    tagged = dataset.score_answer(completions[1], dataset[1])  # the tags are part of the answer: chain_sum's credit
    assert tagged < 1.0 and score_samples(specs, ["q", "q"], completions, columns).total == [1.0, tagged]


def test_rows_without_the_column_are_refused_before_generation():
    from posttrain.rewards.loading import RewardLoadError

    specs = build_reward_specs([{"fn": "reasoning_gym"}], ["rg"])
    with pytest.raises(RewardLoadError, match=r"rewards\[0\].fn = 'reasoning_gym' needs the dataset column "
                       r"`reasoning_gym`.*\['answer'\]"):  # fmt: skip
        check_columns(specs, [{"prompt": "q", "answer": "1"}], "data")


def test_rows_from_another_version_fail_loudly_instead_of_scoring_other_problems():
    rows = load_rows(ReasoningGymSource(task="chain_sum", size=2, seed=1))
    rows[1]["answer"] = "not what the task regenerates"
    with pytest.raises(RewardError, match=r"sample 1: .*chain_sum item 1 regenerates with answer .*another reasoning"):
        scored(rows, ["<answer>0</answer>"] * 2)
    rows[1]["reasoning_gym"] = {"task": "chain_sum"}
    scores = scored(rows, [f"<answer>{rows[0]['answer']}</answer>", "x"], on_error="skip")
    assert scores.total[0] == 1.0 and scores.skipped == [1] and "expected a dict with" in scores.errors[0]


def test_the_shipped_recipe_validates_and_its_rows_feed_its_reward():
    from pathlib import Path

    from posttrain.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "recipes" / "reasoning_gym.yaml")
    assert (cfg.algorithm.name, cfg.model.path, cfg.model.lora is not None) == ("grpo", "smollm2-135m-instruct", True)
    train, held_out = load_rows(cfg.data), load_rows(cfg.eval.data)
    assert (len(train), len(held_out)) == (200, 64) and train[0]["prompt"].endswith("<answer></answer> tags.")
    specs = build_reward_specs([r.model_dump() for r in cfg.rewards], cfg.reward_names())
    check_columns(specs, train, "data")
    columns = {"reasoning_gym": [row["reasoning_gym"] for row in held_out[:3]]}
    completions = [f"<answer>{row['answer']}</answer>" for row in held_out[:3]]
    assert score_samples(specs, ["q"] * 3, completions, columns).total == [1.0] * 3


def test_rows_scored_in_ray_reward_workers_match_in_process_scores(ray_session):
    from posttrain.rewards.workers import RewardPool

    rows = load_rows(ReasoningGymSource(task="countdown", size=4, seed=5))
    entries = [{"fn": "reasoning_gym", "weight": 1.0, "args": {}}]
    specs = build_reward_specs(entries, ["rg"])
    columns = {key: [row[key] for row in rows] for key in ("answer", "reasoning_gym", "metadata")}
    completions = [f"<answer>{row['answer']}</answer>" for row in rows[:2]] + ["<answer>1 + 1</answer>", "none"]
    pool = RewardPool(entries, specs, workers=2)
    try:
        got = pool.score([row["prompt"] for row in rows], completions, columns)
    finally:
        pool.close()
    assert got.total == [1.0, 1.0, 0.05, 0.01]  # the entries Ray carried regenerate and score as here
