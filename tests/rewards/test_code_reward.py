"""The `code_tests` reward (posttrain.rewards.code): extraction, all-or-nothing scoring, None without tests."""

import pytest

from posttrain.rewards.builtin import BUILTIN_REWARDS
from posttrain.rewards.code import code_tests, extract_program
from posttrain.rewards.loading import load_reward_function

GOOD = "Here:\n```python\ndef solve(n):\n    return n * n\n```\n"
IO_GOOD = "```py\nn = int(input())\nprint(n * n)\n```"
TEST = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(3) == 9\n"


def test_extract_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```python\nx = 2\n```\n```text\nnot code\n```"
    assert extract_program(text) == "x = 2\n"
    assert extract_program("no code here") is None


@pytest.mark.bwrap
def test_code_tests_scores_all_or_nothing():
    half = "```python\ndef solve(n):\n    return 4\n```"
    chat = [{"role": "assistant", "content": GOOD}]
    scores = code_tests(
        prompts=["p"] * 6,
        completions=[GOOD, half, "no code", chat, IO_GOOD, GOOD],
        tests=[TEST, TEST, TEST, TEST, None, None],
        entry_point=["solve"] * 6,
        io_cases=[None, None, None, None, [("2", "4"), {"input": "3\n", "output": "9\n"}], None],
    )
    assert scores == [1.0, 0.0, 0.0, 1.0, 1.0, None]


def test_code_tests_is_a_builtin():
    assert BUILTIN_REWARDS["code_tests"] is code_tests
    assert load_reward_function("code_tests") is code_tests


@pytest.mark.bwrap
def test_partial_credit_gives_the_fraction_of_tests_passed():
    half = "```python\ndef solve(n):\n    return 4\n```"  # passes candidate(2) == 4, fails candidate(3) == 9
    io_half = "```python\nprint(4)\n```"  # right for stdin 2, wrong for stdin 3
    scores = code_tests(
        prompts=["p"] * 3,
        completions=[half, GOOD, io_half],
        tests=[TEST, TEST, None],
        entry_point=["solve"] * 3,
        io_cases=[None, None, [("2", "4"), ("3", "9")]],
        partial=True,
    )
    assert scores == [0.5, 1.0, 0.5]
