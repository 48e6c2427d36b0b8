"""Built-in rewards: math_accuracy and format_reward, on hand-written completions."""

import pytest

from posttrain.rewards.builtin import format_reward, math_accuracy
from posttrain.rewards.combine import completion_text


def test_math_accuracy_on_text_completions():
    completions = ["so \\boxed{4}", "\\boxed{5}", "it is 4", "#### 4", "\\boxed{4}"]
    golds = ["4", "4", "4", "4", None]
    assert math_accuracy(prompts=["q"] * 5, completions=completions, answer=golds) == [1.0, 0.0, 0.0, 1.0, None]


def test_math_accuracy_on_conversational_completions():
    completions = [
        [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}],
        [{"role": "assistant", "content": "\\boxed{2}"}, {"role": "user", "content": "\\boxed{0.5}"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "the answer is 0.5"}]}],
    ]
    assert math_accuracy(prompts=[[]] * 3, completions=completions, answer=["0.5"] * 3) == [1.0, 0.0, 1.0]


def test_math_accuracy_accepts_a_solution_column_and_non_string_golds():
    completions = ["\\boxed{72}", "\\boxed{71}"]
    solutions = ["48 + 24 = 72\n#### 72", "48 + 24 = 72\n#### 72"]
    assert math_accuracy(prompts=["q", "q"], completions=completions, solution=solutions) == [1.0, 0.0]
    assert math_accuracy(prompts=["q", "q"], completions=completions, answer=[72, 72.0]) == [1.0, 0.0]


def test_math_accuracy_without_a_gold_column_says_what_is_missing():
    with pytest.raises(TypeError, match="needs the dataset to have an 'answer' column.*'question'"):
        math_accuracy(prompts=["q"], completions=["\\boxed{1}"], question=["q"], completion_ids=[[1]])
    with pytest.raises(ValueError, match="2 gold answers for 1"):
        math_accuracy(prompts=["q"], completions=["\\boxed{1}"], answer=["1", "2"])


def test_completion_text():
    assert completion_text("plain") == "plain"
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text([]) == ""


FORMAT_CASES = [
    ("The sum is \\boxed{4}.", 1.0),
    ("\\boxed{\\frac{1}{2}} and some closing words", 1.0),
    ("<answer>4</answer>", 1.0),
    ("<answer>\\boxed{4}</answer>", 1.0),
    ("<think>2+2 is 4</think>\nThe answer: \\boxed{4}", 1.0),
    ("2+2, maybe \\boxed{5}? no.</think> \\boxed{4}", 1.0),  # <think> opened by the chat template
    ("<think>try \\boxed{3}, \\boxed{4}</think><answer>4</answer>", 1.0),  # boxes while thinking are ignored
    ("4", 0.0),
    ("\\boxed{}", 0.0),
    ("\\boxed{  }", 0.0),
    ("<answer> </answer>", 0.0),
    ("\\boxed{3} or \\boxed{4}", 0.0),
    ("\\boxed{\\boxed{4}}", 0.0),
    ("\\boxed{4", 0.0),
    ("\\boxed{4} \\boxed{", 0.0),
    ("<answer>1</answer><answer>2</answer>", 0.0),
    ("<answer>4", 0.0),
    ("</answer>4<answer>", 0.0),
    ("\\boxed{3} <answer>4</answer>", 0.0),
    ("<think>still thinking \\boxed{4}", 0.0),
    ("<think>a</think> \\boxed{4} <think>more", 0.0),
    ("<think>\\boxed{4}</think>", 0.0),  # the answer must come after the reasoning
]


@pytest.mark.parametrize("completion,expected", FORMAT_CASES)
def test_format_reward(completion, expected):
    assert format_reward(prompts=["q"], completions=[completion]) == [expected]
    conversational = [[{"role": "assistant", "content": completion}]]
    assert format_reward(prompts=[[]], completions=conversational) == [expected]


def test_format_reward_is_linear_on_hostile_input():
    assert format_reward(prompts=["q"], completions=["<answer>" * 50_000 + "\\boxed{" * 50_000]) == [0.0]
