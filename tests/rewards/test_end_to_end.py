"""A user's TRL-style file loaded by path plus built-ins, combined with weights, scored and logged."""

import math
from pathlib import Path

import pytest

from posttrain.rewards.combine import RewardError, RewardSpec, reward_metrics, score_samples
from posttrain.rewards.loading import load_reward_function

PROMPTS = ["What is 2+2?", "What is 3+5?", "What is 10/4?", "What is 7*6?"]
COMPLETIONS = [
    "<think>2+2=4</think> \\boxed{4}",  # right, well formatted
    "3+5 is 8",  # right number, no marker
    "\\boxed{\\frac{5}{2}}",  # right; the TRL regex sees "\frac{5" and says wrong
    "\\boxed{41}",  # wrong
]
COLUMNS = {"answer": ["4", "8", "2.5", "42"], "ground_truth": ["4", "8", "2.5", "42"]}


def specs():
    user_file = "data/trl_style_rewards.py"
    base_dir = Path(__file__).parent
    return [
        RewardSpec(load_reward_function(f"{user_file}:accuracy_reward", base_dir=base_dir), "trl_acc", 0.5),
        RewardSpec(load_reward_function("math_accuracy"), "math_accuracy", 1.0),
        RewardSpec(load_reward_function("format"), "format", 0.25),
        RewardSpec(load_reward_function(f"{user_file}:num_tokens_reward", base_dir=base_dir), "n", -0.01),
    ]


def test_user_file_and_builtins_combined():
    completion_ids = [[1] * 10, [1] * 4, [1] * 8, [1] * 2]
    scores = score_samples(specs(), PROMPTS, COMPLETIONS, COLUMNS, completion_ids=completion_ids)
    assert scores.per_function == {
        "trl_acc": [1.0, 0.0, 0.0, 0.0],
        "math_accuracy": [1.0, 0.0, 1.0, 0.0],
        "format": [1.0, 0.0, 1.0, 1.0],
        "n": [10.0, 4.0, 8.0, 2.0],
    }
    # 0.5*trl_acc + 1*math_accuracy + 0.25*format - 0.01*n
    expected = [0.5 + 1 + 0.25 - 0.10, -0.04, 1 + 0.25 - 0.08, 0.25 - 0.02]
    assert scores.total == pytest.approx(expected, abs=1e-12)
    metrics = reward_metrics(scores)
    assert metrics["reward/mean"] == pytest.approx(sum(expected) / 4, abs=1e-12)
    assert metrics["reward/trl_acc/mean"] == 0.25
    assert metrics["reward/math_accuracy/mean"] == 0.5
    assert metrics["reward/format/mean"] == 0.75
    assert metrics["reward/n/mean"] == 6.0
    assert metrics["reward/skipped"] == 0.0


def test_missing_completion_ids_surfaces_as_an_error_naming_the_user_function():
    # num_tokens_reward requires completion_ids; without them every call raises TypeError, in both modes
    for on_error in ("raise", "skip"):
        with pytest.raises(RewardError, match=r"'n' failed on sample 0: raised TypeError.*completion_ids.*all 4"):
            score_samples(specs(), PROMPTS, COMPLETIONS, COLUMNS, on_error=on_error)
    scores = score_samples(specs()[:3], PROMPTS, COMPLETIONS, COLUMNS, on_error="skip")
    assert not any(math.isnan(t) for t in scores.total)


def test_none_gold_is_not_applicable_and_metrics_skip_it():
    columns = {"answer": ["4", None, "2.5", "42"], "ground_truth": COLUMNS["ground_truth"]}
    scores = score_samples(specs()[1:3], PROMPTS, COMPLETIONS, columns)
    assert scores.per_function["math_accuracy"] == [1.0, None, 1.0, 0.0]
    assert scores.total == [1.25, 0.0, 1.25, 0.25]  # sample 1 scored by format alone
    assert reward_metrics(scores)["reward/math_accuracy/mean"] == pytest.approx(2 / 3, abs=1e-12)
