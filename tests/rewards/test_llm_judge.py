"""The `llm_judge` reward: verdict parsing (pure), judge prompts, recipe checks, and a real judge model (SmolLM2)
served by a rollout worker in a Ray actor shared by the reward workers."""

from __future__ import annotations

import pytest

from posttrain.rewards.combine import RewardError, RewardScores, score_samples
from posttrain.rewards.llm_judge import (
    DEFAULT_RUBRIC,
    JudgeError,
    VerdictError,
    judge_prompt,
    llm_judge,
    parse_verdict,
)
from posttrain.rewards.loading import RewardLoadError, build_reward_specs


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("Score: 7", 7.0),
        ("7/10", 7.0),
        ("**8**/10", 8.0),
        ("Rating: [[6]]", 6.0),
        ('{"score": 9}', 9.0),
        ('{"reasoning": "fine", "score": "4"}', 4.0),
        ("**Score:** 8", 8.0),
        ("Score (0-10): 7", 7.0),  # the announced range is not the score
        ("I'd give it 8 out of 10.", 8.0),
        ("Final score = 6.5", 6.5),
        ("7", 7.0),
        ("**7**", 7.0),
        ("0", 0.0),
        ("Score: 10", 10.0),
        # the last anchored number wins over the reasoning's numbers, before and after it
        ("3 + 4 = 7 is right and 12 steps were shown. Score: 9", 9.0),
        ("Score: 3. On reflection the response is complete. Final score: 8", 8.0),
        ("Rating: [[5]]. It uses 3 examples and 2/3 of them are right.", 5.0),  # 2/3 is not on a 10 scale
        ("<think>maybe Score: 2, or 9?</think>\nScore: 6", 6.0),  # the reasoning block is dropped
    ],
)
def test_parse_verdict_reads_the_final_score(reply, score):
    assert parse_verdict(reply, 0, 10) == score


def test_parse_verdict_on_another_scale():
    assert parse_verdict("4/5", 1, 5) == 4.0
    assert parse_verdict("It is 4/10 good. Rating: 5", 1, 5) == 5.0  # n/10 is not on a 1-5 scale


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        ("Score: 12", "score 12 is outside the scale 0-10"),
        ("Score: -1", "score -1 is outside the scale 0-10"),
        ("12/10", "score 12 is outside"),
        ("The response is fine and gets 3 + 4 = 7 right.", "no score in the judge's reply 'The response is fine"),
        ("", "no score in the judge's reply ''"),
        ("Score: excellent", "no score"),
        ("<think>Score: 7 seems right but", "reasoning (<think>) never closed"),
    ],
)
def test_parse_verdict_names_what_it_cannot_read(reply, words):
    with pytest.raises(VerdictError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_verdict(reply, 0, 10)


def test_judge_prompt_shows_the_reference_answer_only_when_the_row_has_one():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    plain = judge_prompt(None, "R.", (0.0, 10.0), "2+2?", "4", None)
    assert "Request:\n2+2?\n\nResponse:\n4\n\nRubric: R." in plain and "Reference" not in plain
    assert "N a whole number from 0 to 10." in plain
    with_answer = judge_prompt(None, "R.", (1.0, 5.0), chat, [{"role": "assistant", "content": "4"}], 4)
    assert "Request:\nsystem: Be brief.\nuser: 2+2?\n\nReference answer" in with_answer
    assert "with it):\n4\n\nResponse:\n4\n" in with_answer and "from 1 to 5" in with_answer
    assert judge_prompt("Q {prompt} A {completion} G {answer}", "", (0, 1), "q", "c", "g") == "Q q A c G g"
    with pytest.raises(ValueError, match=r"shows \{answer\}, but this row has no `answer`"):
        judge_prompt("{completion} {answer}", "", (0, 1), "q", "c", None)


def test_judge_prompt_shows_an_episodes_whole_transcript():
    # an environment's episode (`rewards:` next to `env:`): the model's turns and the tool's replies, all shown
    turns = [
        {"role": "assistant", "content": "CALC: 2+3"},
        {"role": "user", "content": "Result: 5"},
        {"role": "assistant", "content": "ANSWER: 5"},
    ]
    text = judge_prompt(None, "R.", (0.0, 10.0), [{"role": "user", "content": "2+3?"}], turns, None)
    assert "Request:\nuser: 2+3?\n\nResponse:\nassistant: CALC: 2+3\nuser: Result: 5\nassistant: ANSWER: 5\n\n" in text


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({}, r"llm_judge needs `model`"),
        ({"model": "m", "rubrik": "x"}, r"takes no argument \['rubrik'\]; its arguments: \['model', 'rubric'"),
        ({"model": "m", "prompt_template": "{prompt} {verdict}"}, r"unknown fields \['verdict'\]"),
        ({"model": "m", "prompt_template": "Rate {prompt}"}, r"never shows the \{completion\}"),
        ({"model": "m", "scale": [10, 0]}, r"`scale` must go from low to high, got \[10, 0\]"),
        ({"model": "m", "scale": 10}, r"`scale` must be two numbers"),
        ({"model": "m", "engine": "sglang"}, r"`engine` 'sglang' is not one of \['hf', 'vllm'\]"),
        ({"model": "m", "max_new_tokens": 0}, r"`max_new_tokens` must be an integer >= 1"),
        ({"model": "m", "temperature": -1}, r"`temperature` must be >= 0"),
        ({"model": "m", "rubric": " "}, r"`rubric` must be non-empty"),
    ],
)
def test_bad_args_fail_when_the_recipe_loads_naming_the_reward(args, words):
    with pytest.raises(RewardLoadError, match=r"rewards\[0\] \(llm_judge\)\.args: .*" + words):
        build_reward_specs([{"fn": "llm_judge", "args": args}], ["judge"])


def test_a_recipe_with_a_judge_validates(tmp_path):
    from posttrain.config import load_config

    recipe = tmp_path / "judge.yaml"
    recipe.write_text(
        "algorithm: {name: grpo}\nmodel: {path: smollm2-135m-instruct}\ndata: {kind: arithmetic}\n"
        "rewards:\n  - fn: llm_judge\n    args: {model: smollm2-135m-instruct, scale: [1, 5], max_new_tokens: 64}\n"
        "scoring: {timeout: 600}\n"
    )
    cfg = load_config(recipe)
    assert cfg.reward_names() == ["llm_judge"]
    (spec,) = build_reward_specs([r.model_dump() for r in cfg.rewards], cfg.reward_names())
    assert spec.fn.keywords == {"model": "smollm2-135m-instruct", "scale": [1, 5], "max_new_tokens": 64}


def test_a_judge_that_cannot_load_fails_every_sample_by_name(tmp_path):
    missing = str(tmp_path / "no-judge-here")
    values = llm_judge(["p", "q"], ["a", "b"], model=missing)
    assert all(isinstance(v, JudgeError) and f"the judge {missing!r} failed on this batch" in str(v) for v in values)
    (spec,) = build_reward_specs([{"fn": "llm_judge", "args": {"model": missing}}], ["llm_judge"])
    with pytest.raises(RewardError, match=r"'llm_judge' failed on sample 0: JudgeError: the judge .* all 2 samples"):
        score_samples([spec], ["p", "q"], ["a", "b"], {}, on_error="skip")


TERSE = (
    "Rate this answer from {low} to {high}.\nQuestion: {prompt}\nAnswer: {completion}\n"
    'Reply with the rating only, like "Rating: 7".'
)
"""SmolLM2-135M follows this template on some samples and not others: both outcomes in one batch"""
PROMPTS = ["What is 2 + 3?", "Name the capital of France.", "What is 7 * 6?", "Write a word that rhymes with cat."]
COMPLETIONS = ["2 + 3 = 5. The answer is 5.", "The capital of France is Berlin.", "42", "hat"]


def _expected_by_hand(model: str, shards: int = 2) -> list[float | str]:
    """Each sample judged in this process, straight through an hf rollout worker and `parse_verdict`, in the `shards`
    the reward pool sends (padding a batch can change a greedy token; 4 shards: each prompt alone, unpadded, as vLLM
    runs it): a reward in [0, 1], or the VerdictError's message."""
    from posttrain.models.loading import format_prompt, load_tokenizer
    from posttrain.rewards.workers import shard_bounds
    from posttrain.rollout.types import SamplingParams
    from posttrain.rollout.worker import RolloutWorkerImpl

    tokenizer = load_tokenizer(model)
    texts = [format_prompt(tokenizer, judge_prompt(TERSE, DEFAULT_RUBRIC, (0, 10), p, c, None)) for p, c in SAMPLES]
    worker, params = RolloutWorkerImpl("hf", model), SamplingParams(temperature=0, max_new_tokens=32)
    results = [result for a, b in shard_bounds(len(texts), shards) for result in worker.generate(texts[a:b], params)]
    expected: list[float | str] = []
    for result in results:
        try:
            expected.append(parse_verdict(result.completions[0].text, 0, 10) / 10)
        except VerdictError as error:
            expected.append(str(error))
    return expected


SAMPLES = list(zip(PROMPTS, COMPLETIONS, strict=True))


def _judge_pool_scores(ray_session, args: dict) -> RewardScores:
    """The judge's scores of the 4 samples through a pool of 2 reward workers, which must share one judge actor."""
    from posttrain.rewards.workers import RewardPool

    def judges() -> set[str]:
        named = ray_session.util.list_named_actors(all_namespaces=True)
        return {a["name"] for a in named if a["name"].startswith("posttrain-llm-judge-")}

    before = judges()  # an earlier test's judge may not be gone yet
    entries = [{"fn": "llm_judge", "args": {"prompt_template": TERSE, "max_new_tokens": 32, **args}}]
    pool = RewardPool(entries, build_reward_specs(entries, ["llm_judge"]), workers=2, timeout=600)
    try:
        scores = pool.score(PROMPTS, COMPLETIONS, {}, on_error="skip")
        assert len(judges() - before) == 1  # one for both workers
    finally:
        pool.close()
    return scores


def _check_graded(scores: RewardScores, expected: list[float | str]) -> None:
    """Each sample has the expected reward in [0, 1], or is skipped with its named VerdictError."""
    errors = dict(zip(scores.skipped, scores.errors, strict=True))
    for index, want in enumerate(expected):
        if isinstance(want, float):
            assert index not in errors and scores.per_function["llm_judge"][index] == pytest.approx(want, abs=1e-12)
            assert 0.0 <= scores.total[index] <= 1.0
        else:  # named: the reward, the sample, and the judge's reply
            assert f"reward function 'llm_judge' failed on sample {index}: VerdictError: {want}" in errors[index]
    assert scores.failed == {"llm_judge": sum(isinstance(want, str) for want in expected)}


def test_a_real_judge_grades_through_a_rollout_worker_actor_shared_by_the_reward_workers(ray_session):
    model = "smollm2-135m-instruct"
    _check_graded(_judge_pool_scores(ray_session, {"model": model}), _expected_by_hand(model))


@pytest.mark.slow  # ~1 min on 2 shared cores (vLLM starts in the judge's Ray actor)
def test_a_judge_on_the_vllm_engine_gives_the_hf_judges_greedy_verdicts(ray_session):
    model = "smollm2-135m-instruct"
    scores = _judge_pool_scores(ray_session, {"model": model, "engine": "vllm", "engine_options": {"kv_cache_gb": 1}})
    # greedy, float32, each prompt unpadded on both engines: the same verdict texts, so the same rewards and errors
    expected = _expected_by_hand(model, shards=len(PROMPTS))
    assert sum(isinstance(want, float) for want in expected) >= 1  # at least one sample is graded, not only failed
    _check_graded(scores, expected)
