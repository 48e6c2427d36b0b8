"""Built-in reward functions, in TRL GRPOTrainer's interface. Named in recipes as `math_accuracy`, `format`,
`code_tests` (defined in `rewards.code`), `overlong_penalty` and `length_penalty` (in `rewards.shaping`),
`reward_model` (in `rewards.reward_model`), `llm_judge` (in `rewards.llm_judge`) and `reasoning_gym` (in
`rewards.reasoning_gym`)."""

from __future__ import annotations

import re
from typing import Any

from posttrain.rewards.code import code_tests
from posttrain.rewards.combine import completion_text
from posttrain.rewards.llm_judge import llm_judge
from posttrain.rewards.reasoning_gym import reasoning_gym_reward
from posttrain.rewards.reward_model import reward_model
from posttrain.rewards.shaping import length_penalty, overlong_penalty
from posttrain.verifiers.math import boxed_contents, verify_many

_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"
_ANSWER_BLOCK_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _gold_answers(answer: list | None, kwargs: dict[str, Any], batch_size: int) -> list:
    golds = answer if answer is not None else kwargs.get("solution")
    if golds is None:
        columns = sorted(key for key in kwargs if key not in ("prompts", "completion_ids", "trainer_state"))
        raise TypeError(
            "math_accuracy needs the dataset to have an 'answer' column (or 'solution') holding the gold answer of "
            f"each prompt; the columns passed were {columns}"
        )
    if len(golds) != batch_size:
        raise ValueError(f"math_accuracy got {len(golds)} gold answers for {batch_size} completions")
    return golds


def math_accuracy(
    prompts: list, completions: list, answer: list | None = None, *, timeout: float = 5.0, **kwargs: Any
) -> list[float | None]:
    """1.0 when the completion's marked final answer (`\\boxed{}`, `<answer>`, `####`, "the answer is") equals the
    gold answer, else 0.0; None for a sample whose gold is None.

    `answer` (or, when absent, `solution`) is the dataset column of gold answers, bare or as full solutions.
    Strict extraction: an unmarked answer scores 0.0 (rewarding the last number in the text rewards guessing).
    The checks run on all the workers of the math verifier pool at once; each gets `timeout` seconds (a check
    that runs longer scores 0.0).
    """
    golds = _gold_answers(answer, kwargs, len(completions))
    scored = [i for i, gold in enumerate(golds) if gold is not None]
    verdicts = verify_many(
        [str(golds[i]) for i in scored], [completion_text(completions[i]) for i in scored], timeout=timeout
    )
    values: list[float | None] = [None] * len(completions)
    for i, verdict in zip(scored, verdicts, strict=True):
        values[i] = float(verdict)
    return values


math_accuracy.required_columns = (("answer", "solution"),)  # checked against the dataset before any generation


def _format_ok(text: str) -> bool:
    if _THINK_OPEN in text:
        last_open = text.rfind(_THINK_OPEN)
        if text.find(_THINK_CLOSE, last_open) < 0:
            return False
    final = text.rsplit(_THINK_CLOSE, 1)[-1]  # chat templates may open <think> in the prompt: only </think> shows
    opened, closed = final.count("<answer>"), final.count("</answer>")
    if opened or closed:
        block = _ANSWER_BLOCK_RE.search(final) if opened == closed == 1 else None
        if block is None:
            return False
        outside = final[: block.start()] + final[block.end() :]
        return bool(block.group(1).strip()) and "\\boxed" not in outside and "\\fbox" not in outside
    boxes = boxed_contents(final)
    return len(boxes) == 1 and bool(boxes[0].strip()) and final.count("\\boxed") + final.count("\\fbox") == 1


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the completion has exactly one final answer marker with non-empty content, else 0.0.

    Precisely, with `final` = the text after the last `</think>` (the whole text when there is none):
    - a `<think>` with no `</think>` after it gives 0.0 (reasoning never closed; markers inside the reasoning,
      before the last `</think>`, are ignored);
    - `final` then needs exactly one of: one `<answer>...</answer>` block (non-empty after stripping, no other
      `<answer>`/`</answer>` tags, no `\\boxed` outside it; a `\\boxed{}` inside is fine), or, with no answer
      tags at all, exactly one `\\boxed{...}`/`\\fbox{...}` (braces balanced, non-empty content, not nested).
    Text after the marker is allowed. Whether the answer is right is `math_accuracy`'s business.
    """
    return [1.0 if _format_ok(completion_text(completion)) else 0.0 for completion in completions]


BUILTIN_REWARDS = {
    "math_accuracy": math_accuracy,
    "format": format_reward,
    "code_tests": code_tests,
    "overlong_penalty": overlong_penalty,
    "length_penalty": length_penalty,
    "reward_model": reward_model,
    "llm_judge": llm_judge,
    "reasoning_gym": reasoning_gym_reward,
}
"""Names accepted by `load_reward_function` without a path."""
