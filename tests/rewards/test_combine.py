"""score_samples / reward_metrics: weighted totals, and every way a reward function can fail."""

import asyncio
import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from posttrain.rewards.combine import (
    PartialScores,
    RewardError,
    RewardScores,
    RewardSpec,
    finish_scores,
    reward_metrics,
    score_samples,
)

PROMPTS = ["p0", "p1", "p2"]
COMPLETIONS = ["c0", "c1", "c2"]


def constant(values):
    def fn(prompts, completions, **kwargs):
        return list(values)

    return fn


def raises_on(bad_completion):
    def fn(prompts, completions, **kwargs):
        if bad_completion in completions:
            raise ValueError(f"cannot parse {bad_completion}")
        return [1.0] * len(completions)

    return fn


def score(*specs, on_error="raise", prompts=PROMPTS, completions=COMPLETIONS, columns=None):
    return score_samples(list(specs), prompts, completions, columns or {}, on_error=on_error)


def test_weighted_total_with_none_negative_and_zero_weights():
    scores = score(
        RewardSpec(constant([1.0, 0.0, None]), "a", weight=2.0),
        RewardSpec(constant([0.5, True, 2]), "b", weight=-1.0),
        RewardSpec(constant([7.0, 7.0, 7.0]), "c", weight=0.0),
    )
    # sample 0: 2*1 - 0.5 + 0*7 = 1.5; sample 1: 2*0 - 1*1 = -1; sample 2: a is None -> -1*2 = -2
    assert scores.total == [1.5, -1.0, -2.0]
    assert scores.per_function == {"a": [1.0, 0.0, None], "b": [0.5, 1.0, 2.0], "c": [7.0, 7.0, 7.0]}
    assert all(type(v) is float for v in scores.per_function["b"])
    assert (scores.skipped, scores.errors) == ([], [])


def test_functions_get_keyword_columns_and_completion_ids_like_trl():
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [Fraction(1, 2)] * 3

    scores = score_samples(
        [RewardSpec(spy, "spy")], PROMPTS, COMPLETIONS, {"answer": ["1", "2", "3"]}, completion_ids=[[1], [2], [3]]
    )
    assert seen == {
        "prompts": PROMPTS,
        "completions": COMPLETIONS,
        "answer": ["1", "2", "3"],
        "completion_ids": [[1], [2], [3]],
    }
    assert scores.total == [0.5, 0.5, 0.5]
    seen.clear()
    score(RewardSpec(spy, "spy"))
    assert "completion_ids" not in seen


def test_a_column_named_like_a_bound_argument_does_not_replace_the_recipes_value():
    def scaled(prompts, completions, scale, **kwargs):
        return [scale] * len(completions)

    # the recipe bound scale=2.0 (rewards[i].args); the dataset also has a `scale` column: the recipe's value wins,
    # also when a failing batch is re-called one sample at a time
    spec = RewardSpec(functools.partial(scaled, scale=2.0), "scaled")
    assert score(spec, columns={"scale": [9.0, 9.0, 9.0]}).total == [2.0, 2.0, 2.0]

    def scaled_or_raise(prompts, completions, scale, **kwargs):
        if "c1" in completions:
            raise ValueError("c1")
        return [scale] * len(completions)

    spec = RewardSpec(functools.partial(scaled_or_raise, scale=3.0), "scaled_or_raise")
    scores = score(spec, on_error="skip", columns={"scale": [9.0, 9.0, 9.0]})
    assert scores.per_function["scaled_or_raise"] == [3.0, None, 3.0]


def test_raise_names_function_and_sample_found_by_recalling_one_at_a_time():
    long_prompt = "Q" * 1000
    with pytest.raises(RewardError) as raised:
        score(
            RewardSpec(constant([1.0] * 3), "fine"),
            RewardSpec(raises_on("c2"), "parser"),
            prompts=["p0", "p1", long_prompt],
        )
    message = str(raised.value)
    assert "'parser'" in message and "sample 2" in message and "cannot parse c2" in message
    assert "'c2'" in message and "Q" * 200 in message and "Q" * 201 not in message  # previews are capped
    assert isinstance(raised.value.__cause__, ValueError)


def test_skip_drops_only_the_samples_that_raise():
    scores = score(RewardSpec(raises_on("c1"), "parser"), RewardSpec(constant([1.0, 2.0, 3.0]), "b"), on_error="skip")
    assert scores.total[0] == 2.0 and math.isnan(scores.total[1]) and scores.total[2] == 4.0
    assert scores.skipped == [1]
    assert len(scores.errors) == 1 and "'parser'" in scores.errors[0] and "sample 1" in scores.errors[0]
    assert scores.per_function == {"parser": [1.0, None, 1.0], "b": [1.0, None, 3.0]}


def test_an_exception_returned_for_a_sample_fails_that_sample_without_calling_again():
    calls = []

    def judge(prompts, completions, **kwargs):
        calls.append(len(completions))
        return [0.5, ValueError("no score in the reply 'hmm'"), 1.0]

    scores = score(RewardSpec(judge, "judge", weight=2.0), on_error="skip")
    assert calls == [3]  # the batch once: the function itself said which sample failed
    assert scores.total[0] == 1.0 and math.isnan(scores.total[1]) and scores.total[2] == 2.0
    assert scores.skipped == [1] and scores.failed == {"judge": 1}
    assert "reward function 'judge' failed on sample 1: ValueError: no score in the reply 'hmm'" in scores.errors[0]
    with pytest.raises(RewardError, match=r"'judge' failed on sample 1: ValueError: no score"):
        score(RewardSpec(judge, "judge"))


def test_failure_on_the_batch_but_no_single_sample_always_raises():
    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    with pytest.raises(RewardError, match=r"'batch_only'.*batch too big.*no single sample"):
        score(RewardSpec(batch_only, "batch_only"), on_error="skip")


@pytest.mark.parametrize("values", [[math.nan] * 3, ["a", "b", "c"]])
def test_function_failing_on_every_sample_raises_even_when_skipping(values):
    with pytest.raises(RewardError, match=r"'broken' failed on sample 0: returned .*all 3 samples"):
        score(RewardSpec(constant([1.0] * 3), "fine"), RewardSpec(constant(values), "broken"), on_error="skip")
    with pytest.raises(RewardError, match=r"'always' failed on sample 0: raised ZeroDivisionError.*all 3 samples"):
        score(RewardSpec(lambda **kwargs: [1 / 0], "always"), on_error="skip")
    one = score(RewardSpec(constant([math.nan]), "broken"), on_error="skip", prompts=["p"], completions=["c"])
    assert one.skipped == [0]  # a batch of one: nothing says the function rather than the sample is at fault


def test_a_call_that_never_returned_is_skippable_even_on_every_sample_and_names_where_the_function_is():
    # a reward worker's call that timed out on the whole batch: not evidence of failing on each sample
    specs = [RewardSpec(constant([]), "slow", source="rewards[0].fn = 'my.py:slow'"), RewardSpec(constant([]), "b")]
    partial = PartialScores(
        {"slow": [None] * 3, "b": [1.0, 2.0, 3.0]}, lost=[("slow", i, "timed out") for i in range(3)]
    )
    scores = finish_scores(specs, partial, PROMPTS, COMPLETIONS, on_error="skip")
    assert scores.skipped == [0, 1, 2] and scores.failed == {"slow": 3, "b": 0}
    assert scores.errors[1] == (
        "reward function 'slow' failed on sample 1: timed out\n  function: rewards[0].fn = 'my.py:slow'\n"
        "  prompt: 'p1'\n  completion: 'c1'"
    )
    assert reward_metrics(scores)["reward/slow/failed"] == 3.0 and reward_metrics(scores)["reward/b/failed"] == 0.0
    with pytest.raises(RewardError, match=r"^reward function 'slow' failed on sample 0: timed out\n  function: "):
        finish_scores(specs, partial, PROMPTS, COMPLETIONS, on_error="raise")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(
    "output,words",
    [([1.0, 2.0], ["2 values for 3 samples"]), (1.0, ["float", "expected a list"]), (None, ["NoneType"])],
)
def test_wrong_shape_is_a_programming_error_in_both_modes(on_error, output, words):
    with pytest.raises(RewardError) as raised:
        score(RewardSpec(lambda **kwargs: output, "shape"), on_error=on_error)
    assert "'shape'" in str(raised.value)
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, "1.0", [1.0], complex(1, 0)])
def test_non_finite_or_non_number_values_fail(bad):
    spec = RewardSpec(constant([1.0, bad, 0.0]), "bad_values")
    with pytest.raises(RewardError, match=r"'bad_values' failed on sample 1: returned"):
        score(spec)
    scores = score(spec, on_error="skip")
    assert scores.skipped == [1] and scores.total[0] == 1.0 and scores.total[2] == 0.0
    assert scores.per_function["bad_values"] == [1.0, None, 0.0]


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_a_numpy_array_or_torch_tensor_of_rewards_is_accepted_like_trl(kind):
    array = {"numpy": np.array, "torch": torch.tensor}[kind]
    scores = score(RewardSpec(lambda **kwargs: array([1.0, 0.5, 0.25]), "arr"))
    assert scores.per_function == {"arr": [1.0, 0.5, 0.25]} and scores.total == [1.0, 0.5, 0.25]
    with pytest.raises(RewardError, match=r"'arr' returned an array of shape \(3, 1\), expected one value per"):
        score(RewardSpec(lambda **kwargs: array([[1.0], [0.5], [0.25]]), "arr"))


def test_sample_no_function_scored_is_an_error_not_a_zero():
    specs = (RewardSpec(constant([None, 1.0, None]), "a"), RewardSpec(constant([None, None, 0.0]), "b"))
    with pytest.raises(RewardError, match=r"no reward function scored sample 0.*\['a', 'b'\] returned None"):
        score(*specs)
    scores = score(*specs, on_error="skip")
    assert math.isnan(scores.total[0]) and scores.total[1:] == [1.0, 0.0]
    assert scores.skipped == [0] and "sample 0" in scores.errors[0] and "'p0'" in scores.errors[0]


def test_async_functions_are_awaited_concurrently():
    started = {"a": asyncio.Event(), "b": asyncio.Event()}

    def waits_for(me, other):
        async def fn(prompts, completions, **kwargs):
            started[me].set()
            await asyncio.wait_for(started[other].wait(), timeout=5)  # only returns if both run at once
            return [1.0 if me == "a" else 2.0] * len(completions)

        return fn

    scores = score(
        RewardSpec(waits_for("a", "b"), "a"), RewardSpec(waits_for("b", "a"), "b"), RewardSpec(constant([0.5] * 3), "s")
    )
    assert scores.total == [3.5, 3.5, 3.5]


def test_async_function_inside_a_running_event_loop():
    async def async_len(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [float(len(c)) for c in completions]

    async def caller():  # e.g. a controller that is itself async
        return score(RewardSpec(async_len, "len"), completions=["a", "bb", "ccc"])

    assert asyncio.run(caller()).total == [1.0, 2.0, 3.0]


def test_async_function_that_raises_is_pinned_to_its_sample():
    async def async_parser(prompts, completions, **kwargs):
        if "c0" in completions:
            raise KeyError("c0")
        return [0.25] * len(completions)

    with pytest.raises(RewardError, match=r"'async_parser' failed on sample 0: raised KeyError"):
        score(RewardSpec(async_parser, "async_parser"))
    scores = score(RewardSpec(async_parser, "async_parser"), on_error="skip")
    assert scores.skipped == [0] and scores.total[1:] == [0.25, 0.25]


def test_conversational_samples_in_error_messages():
    prompts = [[{"role": "user", "content": "what is 2+2?"}]]
    completions = [[{"role": "assistant", "content": "five"}]]
    with pytest.raises(RewardError) as raised:
        score(RewardSpec(constant(["5"]), "s"), prompts=prompts, completions=completions)
    assert "user: what is 2+2?" in str(raised.value) and "assistant: five" in str(raised.value)


def test_invalid_calls():
    with pytest.raises(ValueError, match="'answer' has 2 entries for 3"):
        score(RewardSpec(constant([1.0] * 3), "a"), columns={"answer": ["1", "2"]})
    with pytest.raises(ValueError, match="unique"):
        score(RewardSpec(constant([1.0] * 3), "a"), RewardSpec(constant([1.0] * 3), "a"))
    with pytest.raises(ValueError, match="at least one"):
        score()
    with pytest.raises(ValueError, match="on_error"):
        score(RewardSpec(constant([1.0] * 3), "a"), on_error="ignore")


def test_reward_metrics_hand_computed():
    scores = RewardScores(
        total=[1.0, math.nan, 3.0, 4.0],
        per_function={"acc": [1.0, None, 0.0, 1.0], "len": [None, None, None, None]},
        skipped=[1],
        errors=["..."],
    )
    metrics = reward_metrics(scores)
    # totals 1, 3, 4: mean 8/3; population variance ((5/3)^2 + (1/3)^2 + (4/3)^2) / 3 = 42/27
    assert metrics["reward/mean"] == pytest.approx(8 / 3, abs=1e-12)
    assert metrics["reward/std"] == pytest.approx(math.sqrt(42 / 27), abs=1e-12)
    assert metrics["reward/acc/mean"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["reward/acc/count"] == 3.0 and metrics["reward/len/count"] == 0.0
    assert "reward/len/mean" not in metrics
    assert metrics["reward/skipped"] == 1.0
    assert not any(math.isnan(v) for v in metrics.values())


def test_reward_metrics_when_everything_was_skipped():
    metrics = reward_metrics(RewardScores(total=[math.nan], per_function={"a": [None]}, skipped=[0], errors=["x"]))
    assert metrics == {"reward/skipped": 1.0, "reward/a/count": 0.0}


def test_trl_completion_matches_trl_conversational_convention():
    from posttrain.rewards.combine import trl_completion

    assert trl_completion("What is 1+1?", "2") == "2"
    assert trl_completion([{"role": "user", "content": "What is 1+1?"}], "2") == [{"role": "assistant", "content": "2"}]
