"""A calculator tool (`env.path: calculator`): the model may ask for an arithmetic expression's value, reads the
result in the next turn, and answers. Built for the learning test (`tests/envs/test_env_learning.py`): a small model
that answers sums of two-digit numbers by itself is often wrong, one that calls the tool and copies its result is
right, so the reward rises only if the model learns to use the tool over several turns.

Rows need a `prompt` (a string, or chat messages whose last one is the question) and a gold `answer` (an integer).
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Any

from posttrain.envs.base import Environment, Message, StepResult

INSTRUCTION = (
    "You have a calculator. To use it, reply with one line `CALC: <expression>`, e.g. `CALC: 12 + 30`, and it tells "
    "you the result. When you know the answer, reply with one line `ANSWER: <number>`."
)
_CALL = re.compile(r"CALC:\s*([^\n`]*)", re.IGNORECASE)
_ANSWER = re.compile(r"ANSWER:\s*(-?\d+)", re.IGNORECASE)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_MAX_DIGITS = 12  # a product of huge numbers would only waste the reply's tokens


class CalculatorError(ValueError):
    """The model's expression is not one the calculator computes (the reply says why; the episode goes on)."""


def calculate(expression: str) -> int:
    """The value of an integer expression of `+`, `-`, `*` and parentheses (no `eval`: the model writes it)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalculatorError(f"cannot read {expression.strip()!r}") from None

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            result = _OPS[type(node.op)](value(node.left), value(node.right))
            if len(str(abs(result))) > _MAX_DIGITS:
                raise CalculatorError(f"the result has more than {_MAX_DIGITS} digits")
            return result
        raise CalculatorError(f"only integers, +, -, * and parentheses: cannot compute {expression.strip()!r}")

    return value(tree.body)


class Calculator(Environment):
    """Turn by turn: `ANSWER: n` ends the episode (reward 1.0 if n equals the row's `answer`, else 0.0); otherwise a
    `CALC: <expression>` gets `Result: <value>` back; a turn with neither gets a nudge. An episode that never
    answers ends at `env.max_turns` with no reward."""

    def __init__(self, instruction: str = INSTRUCTION, role: str = "user"):
        self.instruction, self.role = instruction, role

    def reset(self, row: dict[str, Any]) -> list[Message]:
        self.answer = int(str(row["answer"]).strip())
        prompt = row["prompt"]
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        system = [{"role": "system", "content": self.instruction}] if self.instruction else []
        return system + messages

    def step(self, messages: list[Message]) -> StepResult:
        text = messages[-1]["content"]
        answer = _ANSWER.search(text)
        if answer is not None:
            return StepResult([], reward=float(int(answer.group(1)) == self.answer), done=True)
        call = _CALL.search(text)
        if call is None:
            reply = "Reply with `CALC: <expression>` or `ANSWER: <number>`."
        else:
            try:
                reply = f"Result: {calculate(call.group(1))}"
            except CalculatorError as error:
                reply = f"Calculator error: {error}"
        return StepResult([{"role": self.role, "content": reply}], reward=None)
