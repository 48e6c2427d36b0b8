"""`llm_judge`: a second language model grades each completion against a rubric; its verdict, parsed, is the reward.

Recipe use:

    rewards:
      - fn: llm_judge
        args: {model: Qwen/Qwen2.5-7B-Instruct, scale: [0, 10], max_new_tokens: 256}

The judge is a rollout worker (`rollout.worker.RolloutWorker`, the hf or vllm engine that generates the policy's
completions) in one named Ray actor per (model, engine, dtype, batch size) and per Ray job, shared by every reward
worker (`rewards.shared_actor`); outside Ray (`posttrain eval` in one process) the same worker runs in this process.
Each completion becomes one judge prompt (`prompt_template` through the judge's chat template), decoded with
`temperature` (greedy by default) and read by `parse_verdict`; the score on `scale` is mapped linearly onto [0, 1].

A verdict with no readable score, a score outside the scale, and a judge that fails (cannot load, raises, its actor
dies) are failures of the samples concerned, named like those of a reward function that raised: the run stops, or
with `algorithm.on_reward_error: skip` those samples are dropped and counted in `reward/llm_judge/failed`. Never 0.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
from dataclasses import dataclass, fields
from typing import Any

from posttrain.rewards.combine import completion_text
from posttrain.rewards.shared_actor import actor_name, call_shared_actor

DEFAULT_RUBRIC = (
    "Judge how well the response answers the request. Correctness matters most, then completeness, then clarity. "
    "A wrong, empty or off-topic response gets the lowest score; a correct, complete and clear one the highest."
)
DEFAULT_TEMPLATE = (
    "You are grading a response to a request.\n\n"
    "Request:\n{prompt}\n\n"
    "Response:\n{completion}\n\n"
    "Rubric: {rubric}\n\n"
    'Give one sentence of reasoning, then end with a line "Score: N", N a whole number from {low} to {high}.'
)
DEFAULT_TEMPLATE_WITH_ANSWER = DEFAULT_TEMPLATE.replace(
    "Response:\n", "Reference answer (the response must agree with it):\n{answer}\n\nResponse:\n"
)
"""the default when the row has an `answer` column (value not None)"""
TEMPLATE_FIELDS = ("prompt", "completion", "answer", "rubric", "low", "high")
ENGINES = ("hf", "vllm")
_ACTOR_PREFIX = "posttrain-llm-judge-"
_PREVIEW_CHARS = 300


class VerdictError(ValueError):
    """The judge's reply holds no score on the scale; the message quotes it."""


class JudgeError(RuntimeError):
    """The judge could not grade a batch (its model did not load, its engine raised, its actor died)."""


_NUMBER = r"(-?\d+(?:\.\d+)?)"
_KEYWORD_RE = re.compile(
    r"\b(?:score|rating|grade)\b"
    r"(?:\s*[(\[]\s*-?\d+(?:\.\d+)?\s*(?:-|to)\s*\d+(?:\.\d+)?\s*[)\]])?"  # an announced range: "Score (0-10): 7"
    r"[\s\"'*_`]*(?:is|of|=|:)?[\s\"'*_`\[(]*" + _NUMBER,
    re.IGNORECASE,
)
_DOUBLE_BRACKET_RE = re.compile(r"\[\[\s*" + _NUMBER + r"\s*\]\]")  # MT-Bench's "Rating: [[6]]"
_FRACTION_RE = re.compile(_NUMBER + r"[*_]*\s*(?:/|out of)\s*[*_]*(\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_RE = re.compile(r"^[\s*_`\[(\"']*" + _NUMBER + r"[\s*_`\])\"'.]*$")


def _preview(text: str) -> str:
    return repr(text[:_PREVIEW_CHARS] + ("..." if len(text) > _PREVIEW_CHARS else ""))


def parse_verdict(text: str, low: float = 0, high: float = 10) -> float:
    """The score a judge's reply gives, on the scale [low, high].

    Read, in this order of trust: the reasoning of a `<think>` block is dropped; then the last number that follows
    "score", "rating" or "grade" ("Score: 7", "**Score:** 7", `{"score": 9}`, "Rating: [[6]]", "Score (0-10): 7"),
    a `[[n]]` or an `n/high` ("7/10", "**8**/10", "8 out of 10") wins, whichever comes last in the text, so a final
    verdict beats numbers quoted in the reasoning before it; failing those, a reply that is a bare number ("7").
    Never the last number of free text (that reads the reasoning's arithmetic as a grade).
    Raises `VerdictError` quoting the reply when none is found, the reasoning never closed, or the score lies
    outside [low, high] (a judge confused about the scale is not clipped into it).
    """
    if "<think>" in text and "</think>" not in text:
        raise VerdictError(f"the judge's reasoning (<think>) never closed, so it gave no verdict: {_preview(text)}")
    verdict = text.rsplit("</think>", 1)[-1]
    found = [(m.start(1), m.group(1)) for m in _KEYWORD_RE.finditer(verdict)]
    found += [(m.start(1), m.group(1)) for m in _DOUBLE_BRACKET_RE.finditer(verdict)]
    found += [(m.start(1), m.group(1)) for m in _FRACTION_RE.finditer(verdict) if float(m.group(2)) == high]
    if not found and (bare := _BARE_RE.match(verdict)):
        found = [(0, bare.group(1))]
    if not found:
        raise VerdictError(f"no score in the judge's reply {_preview(text)}")
    score = float(max(found)[1])
    if not low <= score <= high:
        raise VerdictError(
            f"score {score:g} is outside the scale {low:g}-{high:g} in the judge's reply {_preview(text)}"
        )
    return score


@dataclass(frozen=True)
class JudgeSettings:
    """`llm_judge`'s recipe arguments (`rewards[i].args`), checked on construction: ValueError (TypeError for a
    wrong type) naming the one it cannot use."""

    model: str = ""
    """the judge: a folder, a hub id or `smollm2-135m-instruct` (required)"""
    rubric: str = DEFAULT_RUBRIC
    prompt_template: str | None = None
    """with fields from `TEMPLATE_FIELDS` ({completion} required); None: `DEFAULT_TEMPLATE` (with the reference
    answer when the row has one)"""
    scale: tuple = (0, 10)
    """[lowest, highest] score the judge gives; mapped linearly onto [0, 1]"""
    max_new_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy"""
    engine: str = "hf"
    batch_size: int = 16
    """judge prompts the engine generates together"""
    dtype: str = "float32"
    num_gpus: float = 0
    """the judge actor's share of a GPU"""
    engine_options: dict | None = None
    """the vllm engine's options (`gpu_memory_utilization`, `max_model_len`, ...; `rollout/vllm_engine.py`)"""

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"llm_judge needs `model`: the judge's folder or hub id, got {self.model!r}")
        if not isinstance(self.rubric, str) or not self.rubric.strip():
            raise ValueError(f"llm_judge `rubric` must be non-empty text, got {self.rubric!r}")
        if self.prompt_template is not None:
            _check_template(self.prompt_template)
        scale = self.scale
        if not (isinstance(scale, list | tuple) and len(scale) == 2 and all(isinstance(v, int | float) for v in scale)):
            raise TypeError(f"llm_judge `scale` must be two numbers [lowest, highest], got {scale!r}")
        if not scale[0] < scale[1]:
            raise ValueError(f"llm_judge `scale` must go from low to high, got {list(scale)}")
        object.__setattr__(self, "scale", (float(scale[0]), float(scale[1])))
        if self.engine not in ENGINES:
            raise ValueError(f"llm_judge `engine` {self.engine!r} is not one of {list(ENGINES)}")
        for key in ("max_new_tokens", "batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"llm_judge `{key}` must be an integer >= 1, got {getattr(self, key)!r}")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            raise ValueError(f"llm_judge `temperature` must be >= 0 (0 = greedy), got {self.temperature!r}")

    @classmethod
    def of(cls, args: dict[str, Any]) -> JudgeSettings:
        """The settings among `args` (a reward function also gets the dataset's columns as keyword arguments)."""
        return cls(**{key: value for key, value in args.items() if key in _SETTINGS})


_SETTINGS = [field.name for field in fields(JudgeSettings)]


def _check_template(template: str) -> None:
    named = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    unknown = sorted(named - set(TEMPLATE_FIELDS))
    if unknown or "completion" not in named:
        problem = f"has unknown fields {unknown}" if unknown else "never shows the {completion}"
        raise ValueError(
            f"llm_judge `prompt_template` {problem}; its fields: {list(TEMPLATE_FIELDS)} (write {{{{ }}}} for a "
            "literal brace)"
        )


def check_args(**args: Any) -> None:
    """Run when the recipe loads (`rewards.loading`), before any model is: `llm_judge` takes its `args`."""
    unknown = sorted(set(args) - set(_SETTINGS))
    if unknown:
        raise ValueError(f"llm_judge takes no argument {unknown}; its arguments: {_SETTINGS}")
    JudgeSettings(**args)


def _prompt_text(prompt: str | list[dict]) -> str:
    """A policy prompt as text for the judge: a string as is, chat messages as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role', 'user')}: {completion_text([m])}" for m in prompt if isinstance(m, dict))


def judge_prompt(template: str | None, rubric: str, scale: tuple, prompt: Any, completion: Any, answer: Any) -> str:
    """The text the judge reads for one sample (before its chat template). `template` None picks the default, with
    the reference answer when there is one. A template that asks for `{answer}` on a row without one raises
    ValueError."""
    if template is None:
        template = DEFAULT_TEMPLATE if answer is None else DEFAULT_TEMPLATE_WITH_ANSWER
    elif answer is None and "{answer}" in template:
        raise ValueError("llm_judge `prompt_template` shows {answer}, but this row has no `answer` column value")
    low, high = (f"{v:g}" for v in scale)
    # an environment episode's completion is several messages (the model's turns and the replies): shown whole
    shown = (
        _prompt_text(completion)
        if isinstance(completion, list) and len(completion) > 1
        else completion_text(completion)
    )
    fields = {"prompt": _prompt_text(prompt), "completion": shown, "rubric": rubric}
    return template.format(**fields, answer="" if answer is None else str(answer), low=low, high=high)


def _score(reply: Any, scale: tuple, max_new_tokens: int) -> float | Exception:
    """One generated verdict (a rollout `Completion`) as a reward in [0, 1], or the VerdictError saying why not."""
    try:
        score = parse_verdict(reply.text, *scale)
    except VerdictError as error:
        if reply.finish_reason == "length":
            return VerdictError(f"{error} (cut at max_new_tokens={max_new_tokens}: raise it)")
        return error
    return (score - scale[0]) / (scale[1] - scale[0])


@functools.cache
def _tokenizer(model: str):
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer(model)


@functools.cache
def _local_judge(engine: str, model: str, dtype: str, batch_size: int, options: str):
    from posttrain.rollout.worker import RolloutWorkerImpl

    return RolloutWorkerImpl(engine, model, dtype, batch_size, engine_options=json.loads(options))


def _generate(settings: tuple, num_gpus: float, texts: list[str], params: Any) -> list:
    """The judge's replies (`PromptResult`s) to `texts`: in this process outside Ray, else on the shared actor."""
    import ray

    from posttrain.rollout.worker import RolloutWorker

    engine, model, dtype, batch_size, options = settings
    if not ray.is_initialized():
        return _local_judge(*settings).generate(texts, params)
    threads = (os.cpu_count() or 1) if num_gpus == 0 else None  # Ray starts actors with one torch thread
    init_args = (engine, model, dtype, batch_size, threads, json.loads(options))
    name = actor_name(_ACTOR_PREFIX, settings)
    return call_shared_actor(
        name, RolloutWorker, init_args, num_gpus, "generate", texts, params, what="its rollout worker"
    )


def llm_judge(prompts: list, completions: list, answer: list | None = None, **kwargs: Any) -> list[float | Exception]:
    """The judge's grade of each completion, mapped from its scale onto [0, 1]; a `VerdictError` or `JudgeError` in
    place of the samples it could not grade (see the module docstring). The recipe's `args` are `JudgeSettings`;
    `answer`, the dataset column of reference answers, is shown to the judge when present."""
    from posttrain.models.loading import format_prompt
    from posttrain.rollout.types import SamplingParams

    judge = JudgeSettings.of(kwargs)
    model = os.path.abspath(judge.model) if os.path.isdir(judge.model) else judge.model
    answers = answer if answer is not None else [None] * len(completions)
    rewards: list[float | Exception | None] = []  # None: judged below
    texts = []  # the judge prompts of the samples that have one
    params = SamplingParams(temperature=judge.temperature, max_new_tokens=judge.max_new_tokens)
    options = json.dumps(judge.engine_options or {}, sort_keys=True)
    settings = (judge.engine, model, judge.dtype, judge.batch_size, options)
    # A judge failure fails every sample of the batch by name here: raised, the batch would be retried sample by
    # sample (`combine.score_partial`), one judge call each.
    try:
        tokenizer = _tokenizer(model)
        prompt_of = functools.partial(judge_prompt, judge.prompt_template, judge.rubric, judge.scale)
        for sample in zip(prompts, completions, answers, strict=True):
            try:
                texts.append(format_prompt(tokenizer, prompt_of(*sample)))
                rewards.append(None)
            except ValueError as error:  # a template asking for an answer the row lacks: this sample only
                rewards.append(error)
        replies = (
            [result.completions[0] for result in _generate(settings, judge.num_gpus, texts, params)] if texts else []
        )
    except Exception as error:
        failure = JudgeError(f"the judge {model!r} failed on this batch: {type(error).__name__}: {error}")
        return [failure] * len(completions)
    judged = iter(replies)
    return [_score(next(judged), judge.scale, judge.max_new_tokens) if reward is None else reward for reward in rewards]


llm_judge.check_args = check_args  # run on the recipe's `args` when it loads
