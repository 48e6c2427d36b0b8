"""Loading `env.path` like a reward (`rewards/loading.py`), the `env:` recipe section, and how episode samples reach
the learner's batch: the loss mask covers the model's tokens only."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.algorithms.registry import readers
from posttrain.config import ConfigError, validate_config
from posttrain.data.types import Sample
from posttrain.envs import EnvLoadError, load_environment
from posttrain.learner.batch import collate

GUESS = Path(__file__).parent / "data" / "guess_number.py"


def test_a_users_file_loads_as_a_factory_of_fresh_environments_with_its_args():
    factory = load_environment(f"{GUESS}:GuessNumber", {"high": 5})
    first, second = factory(), factory()
    assert first is not second and first.high == 5
    opening = first.reset({"answer": 3})
    assert opening == [
        {"role": "user", "content": "I picked a number from 0 to 5. Guess it: answer with the number only."}
    ]
    assert (
        first.step([*opening, {"role": "assistant", "content": "1"}]).messages[0]["content"]
        == "No, higher. Guess again."
    )
    result = first.step([*opening, {"role": "assistant", "content": "it is 3"}])
    assert (result.reward, result.done, result.messages) == (1.0, True, [])


@pytest.mark.parametrize(
    "spec,args,words",
    [
        ("missing.py:GuessNumber", {}, ["env.path", "environment spec", "does not exist"]),
        (f"{GUESS}:Nope", {}, ["env.path", "has no 'Nope'", "GuessNumber"]),
        (f"{GUESS}:GuessNumber", {"hihg": 5}, ["env.args", "hihg"]),
        ("posttrain.envs.base:StepResult", {}, ["env.path", "StepResult has no reset or step method"]),
        ("no_such_module_xyz:Env", {}, ["env.path", "no module named 'no_such_module_xyz'"]),
    ],
)
def test_a_bad_env_spec_or_args_is_named(spec, args, words):
    with pytest.raises(EnvLoadError) as info:
        load_environment(spec, args)
    for word in words:
        assert word in str(info.value)


def recipe(**env) -> dict:
    return {
        "model": {"path": "smollm2-135m-instruct"},
        "data": {"kind": "arithmetic", "num_problems": 4},
        "env": {"path": f"{GUESS}:GuessNumber", **env},
    }


def test_the_env_section_replaces_rewards_for_the_algorithms_whose_spec_reads_it():
    cfg = validate_config(recipe(max_turns=3, args={"high": 5}))
    assert (cfg.env.max_turns, cfg.env.args, cfg.env.on_error, cfg.rewards) == (3, {"high": 5}, "skip", [])
    with_env = ["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "rft", "ppo"]
    assert readers("env") == with_env  # the registry says who trains on episodes
    for name in with_env[1:]:
        validate_config({**recipe(), "algorithm": {"name": name}})
    with pytest.raises((ConfigError, ValueError), match=f"env: only algorithm.name={' or '.join(with_env)} uses"):
        validate_config({**recipe(), "algorithm": {"name": "opd"}, "opd": {"teacher": "smollm2-135m-instruct"}})
    both = validate_config({**recipe(), "rewards": [{"fn": "format", "weight": 0.5}]})  # they score the transcript
    assert both.reward_names() == ["format"] and both.rewards[0].weight == 0.5
    with pytest.raises((ConfigError, ValueError), match="environment's reward is logged as `env`; set `name:`"):
        validate_config({**recipe(), "rewards": [{"fn": "format", "name": "env"}]})
    validate_config({**recipe(), "eval": {"data": {"kind": "arithmetic", "num_problems": 2}}})  # held-out episodes
    with pytest.raises((ConfigError, ValueError), match="env.on_error"):
        validate_config(recipe(on_error="ignore"))


def test_collate_puts_an_episodes_mask_into_the_loss_mask_and_a_skipped_episode_has_none():
    def episode(completion, mask):
        return Sample("p", [5, 6], "c", completion, [-0.5] * len(completion), "done", 0, completion_mask=mask)

    samples = [episode([1, 2, 3, 4, 5], [1, 1, 0, 0, 1]), episode([7, 8, 9], [1, 0, 1]), episode([3, 3], [1, 1])]
    batch = collate(samples, [1.0, -1.0, math.nan], pad_token_id=0, max_completion_tokens=16)
    expected = torch.tensor([[1, 1, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(batch.loss_mask_BC, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sample 0 has 5 completion tokens but a mask of 2"):
        collate([episode([1, 2, 3, 4, 5], [1, 0])], [1.0], 0, 16)


def test_the_docs_example_is_the_environment_the_tests_train_on():
    docs = (Path(__file__).parents[2] / "docs" / "environments.md").read_text()
    source = GUESS.read_text()
    example = source[source.index("import re") : source.index("\n\n\nclass ShapedGuessNumber")]
    assert f"```python\n{example}\n```" in docs
    assert len(example.splitlines()) <= 30
