"""Reward specs from a recipe: built-ins, bound `args:`, and argument errors caught before any work."""

import pytest

from posttrain.config import validate_config
from posttrain.online.components import load_reward_specs
from posttrain.rewards.loading import RewardLoadError

BASE = {"model": {"path": "m"}, "data": {"kind": "arithmetic"}}


def test_args_are_bound_and_named_after_the_function():
    cfg = validate_config(
        {
            **BASE,
            "rewards": [
                {"fn": "posttrain.rewards.shaping:overlong_penalty", "args": {"max_tokens": 10, "cache_tokens": 4}},
            ],
        }
    )
    (spec,) = load_reward_specs(cfg)
    assert spec.name == "overlong_penalty"
    assert spec.fn(["p"], ["c"], completion_ids=[[0] * 8]) == [-0.5]


@pytest.mark.parametrize(
    "args, fragment",
    [({"max_tokens": 10}, "needs ['cache_tokens']"), ({}, "needs ['max_tokens', 'cache_tokens']")],
)
def test_missing_or_misspelt_args_fail_before_work(args, fragment):
    cfg = validate_config({**BASE, "rewards": [{"fn": "posttrain.rewards.shaping:overlong_penalty", "args": args}]})
    with pytest.raises(RewardLoadError, match=r"rewards\[0\] \(posttrain.rewards.shaping:overlong_penalty\).args"):
        load_reward_specs(cfg)
    with pytest.raises(RewardLoadError) as info:
        load_reward_specs(cfg)
    assert fragment in str(info.value)


def test_unknown_arg_for_a_function_without_kwargs(tmp_path):
    (tmp_path / "r.py").write_text("def score(prompts, completions, answer):\n    return [0.0] * len(prompts)\n")
    cfg = validate_config({**BASE, "rewards": [{"fn": f"{tmp_path}/r.py:score", "args": {"scale": 2}}]})
    with pytest.raises(RewardLoadError, match=r"score takes no argument \['scale'\]"):
        load_reward_specs(cfg)
