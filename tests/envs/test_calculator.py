"""The built-in calculator environment: the expressions it computes, the ones it refuses by name, and a whole
episode's turns (call, result, answer) as the episode runner sees them."""

from __future__ import annotations

import pytest

from posttrain.envs import load_environment
from posttrain.envs.calculator import INSTRUCTION, CalculatorError, calculate


def test_calculate_computes_integer_arithmetic_without_eval():
    assert calculate("12 + 30") == 42 and calculate(" (2 + 3) * 4 ") == 20 and calculate("-5 + 2 - 10") == -13
    with pytest.raises(CalculatorError, match="only integers, \\+, -, \\* and parentheses: cannot compute '7 / 2'"):
        calculate("7 / 2")
    with pytest.raises(CalculatorError, match='cannot compute "__import__'):
        calculate("__import__('os').getcwd()")
    with pytest.raises(CalculatorError, match=r"cannot read '12 \+'"):
        calculate("12 +")
    with pytest.raises(CalculatorError, match="more than 12 digits"):
        calculate("999999 * 999999 * 999999")


def test_an_episode_calls_the_tool_reads_the_result_and_answers():
    env = load_environment("calculator")()  # the built-in name, as `env.path: calculator`
    messages = env.reset({"prompt": "What is 17 + 25?", "answer": "42"})
    assert messages == [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "What is 17 + 25?"}]

    def turn(text):
        messages.append({"role": "assistant", "content": text})
        result = env.step(messages)
        messages.extend(result.messages)
        return result

    nudge = turn("Let me think.")
    assert nudge.messages[0]["content"].startswith("Reply with `CALC:") and (nudge.reward, nudge.done) == (None, False)
    assert turn("CALC: 17 + 25").messages == [{"role": "user", "content": "Result: 42"}]
    assert turn("calc: 17 / 25").messages[0]["content"].startswith("Calculator error: only integers")
    right = turn("ANSWER: 42")
    assert (right.messages, right.reward, right.done) == ([], 1.0, True)
    env.reset({"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": 2})  # chat messages, an int
    assert env.step([{"role": "assistant", "content": "CALC: 1 + 1\nANSWER: 3"}]).reward == 0.0  # answer wins
