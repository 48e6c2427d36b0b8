"""Score a batch of completions with several reward functions and combine them with weights.

Reward functions follow TRL GRPOTrainer's interface: `fn(prompts=..., completions=..., completion_ids=...,
**dataset_columns) -> list[float | None]`, called with keyword arguments exactly as TRL calls them, so TRL
functions work unchanged. `None` means "not applicable to this sample"; an `Exception` instance in place of a
value fails that sample with the exception's message (how a function that scores a batch in one call, like
`llm_judge`, names the samples it could not score). `async def` functions are awaited, concurrently with each other.

Failures are loud: a function that raises, returns the wrong shape, or returns something that is not a finite
real number fails the batch (`on_error="raise"`) or, where the failure is pinned to samples, drops those samples
(`on_error="skip"`). A sample that no function scored is a failure too, never a silent zero.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import numbers
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

_PREVIEW_CHARS = 200


@dataclass
class RewardSpec:
    """One reward function, the name it is logged under, and its weight in the total (may be 0 or negative)."""

    fn: Callable[..., Any]
    name: str
    weight: float = 1.0
    source: str = ""
    """where the recipe names it (`rewards[0].fn = 'my_rewards.py:f'`), shown in its failures"""


class RewardError(Exception):
    """A reward function failed; the message names the function and, where known, the offending sample."""


@dataclass
class RewardScores:
    """Scores of one batch of B samples."""

    total: list[float]
    """[B] weighted sum over the functions that returned a number; NaN for a skipped sample"""
    per_function: dict[str, list[float | None]] = field(default_factory=dict)
    """name -> [B] the function's values as floats (bool -> 0/1), None where not applicable or skipped"""
    skipped: list[int] = field(default_factory=list)
    """indices of the samples dropped with on_error="skip", ascending"""
    errors: list[str] = field(default_factory=list)
    """one message per skipped sample, in the order of `skipped`"""
    failed: dict[str, int] = field(default_factory=dict)
    """name -> samples the function failed on (raised, bad value, timed out, its worker died): skipped ones"""


@dataclass
class _Failure:
    """A failure pinned to one sample."""

    message: str
    index: int
    cause: BaseException | None = None


def _preview(value: Any) -> str:
    if isinstance(value, list):  # conversational: [{"role": ..., "content": ...}, ...]
        value = " | ".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in value)
    text = str(value)
    return repr(text[:_PREVIEW_CHARS] + ("..." if len(text) > _PREVIEW_CHARS else ""))


def _sample_message(name: str | None, index: int, what: str, prompts: list, completions: list, source: str = "") -> str:
    who = f"reward function {name!r} failed on" if name else "no reward function scored"
    where = f"  function: {source}\n" if source else ""
    return (
        f"{who} sample {index}: {what}\n{where}"
        f"  prompt: {_preview(prompts[index])}\n  completion: {_preview(completions[index])}"
    )


def _run_coroutine(coroutine: Any) -> Any:
    """Run a coroutine to completion whether or not this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # asyncio.run refuses to nest inside a running loop: use a fresh loop in a fresh thread (blocks the caller).
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _call_all(calls: list[tuple[Callable[..., Any], dict[str, Any]]]) -> list[Any]:
    """Call each fn(**kwargs); await the async ones concurrently. An exception is returned in place of a result."""
    results: list[Any] = []
    pending: dict[int, Any] = {}
    for fn, kwargs in calls:
        try:
            result = fn(**kwargs)
        except Exception as error:
            result = error
        if inspect.isawaitable(result):
            pending[len(results)] = result
        results.append(result)
    if pending:

        async def gather() -> list[Any]:
            return await asyncio.gather(*pending.values(), return_exceptions=True)

        for position, value in zip(pending, _run_coroutine(gather()), strict=True):
            results[position] = value
    return results


def _check_values(name: str, output: Any, batch_size: int) -> tuple[list[float | None], list[_Failure]]:
    """Floats (or None) from one function's output, plus a failure for each value that is not a finite number (an
    `Exception` value is the function's own account of that sample's failure)."""
    output = _as_list(name, output)
    if not isinstance(output, list | tuple):
        raise RewardError(f"reward function {name!r} returned {type(output).__name__}, expected a list of floats")
    if len(output) != batch_size:
        raise RewardError(f"reward function {name!r} returned {len(output)} values for {batch_size} samples")
    values: list[float | None] = []
    failures = []
    for index, value in enumerate(output):
        if isinstance(value, Exception):  # the function failed this sample on its own (e.g. an unparsable verdict)
            failures.append(_Failure(f"{type(value).__name__}: {value}", index, value))
            values.append(None)
            continue
        number = float(value) if isinstance(value, numbers.Real) else None
        if value is not None and (number is None or not math.isfinite(number)):
            shown = repr(value)[:_PREVIEW_CHARS]
            failures.append(_Failure(f"returned {shown} (expected a finite real number or None)", index))
            number = None
        values.append(number)
    return values, failures


def _as_list(name: str, output: Any) -> Any:
    """A 1-D numpy array or torch tensor as a list of numbers (TRL takes them: it turns outputs into a tensor)."""
    if isinstance(output, list | tuple) or not hasattr(output, "tolist") or not hasattr(output, "shape"):
        return output
    if len(output.shape) != 1:
        shape = tuple(output.shape)
        raise RewardError(f"reward function {name!r} returned an array of shape {shape}, expected one value per sample")
    return output.tolist()


def _unbound(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` without the keys the recipe's `args:` bound on `fn`: a dataset column that happens to share a name
    with a bound argument (`model`, `scale`, ...) must not silently replace the recipe's value."""
    bound = fn.keywords if isinstance(fn, functools.partial) else {}
    return {key: value for key, value in kwargs.items() if key not in bound} if bound else kwargs


def _one_sample_kwargs(kwargs: dict[str, Any], index: int) -> dict[str, Any]:
    return {key: column[index : index + 1] for key, column in kwargs.items()}


def _values_one_at_a_time(spec: RewardSpec, kwargs: dict[str, Any], batch_error: BaseException, batch_size: int):
    """After a whole-batch call raised, call the function per sample to find which samples make it raise."""
    outputs = _call_all([(spec.fn, _one_sample_kwargs(kwargs, i)) for i in range(batch_size)])
    values: list[float | None] = []
    failures: list[_Failure] = []
    for index, output in enumerate(outputs):
        if isinstance(output, BaseException):
            failures.append(_Failure(f"raised {type(output).__name__}: {output}", index, output))
            values.append(None)
            continue
        (value,), value_failures = _check_values(spec.name, output, 1)
        failures += [_Failure(f.message, index) for f in value_failures]
        values.append(value)
    if not failures:  # raises on the batch but on no single sample: nothing to pin, so nothing to skip
        raise RewardError(
            f"reward function {spec.name!r} raised {type(batch_error).__name__}: {batch_error} on the batch of "
            f"{batch_size}, but on no single sample"
        ) from batch_error
    return values, failures


def trl_completion(prompt: Any, text: str) -> Any:
    """A completion as TRL's GRPOTrainer hands it to reward functions: the text for a plain-text prompt, or
    `[{"role": "assistant", "content": text}]` when the prompt is a list of chat messages."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def completion_text(completion: Any) -> str:
    """The text of a completion (`trl_completion`'s inverse, for reward functions): the string itself, or the content
    of the last assistant message of a chat.

    Chat content given as a list of parts (`[{"type": "text", "text": ...}]`) has its text parts joined.
    """
    if isinstance(completion, str):
        return completion
    messages = [m for m in completion if isinstance(m, dict)]
    assistant = [m for m in messages if m.get("role") == "assistant"] or messages
    if not assistant:
        return ""
    content = assistant[-1].get("content") or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


@dataclass
class PartialScores:
    """Each function's values on a batch and the failures pinned to samples, before combining: what a reward
    worker sends back (plain data, so it crosses process boundaries) and `finish_scores` turns into scores."""

    per_function: dict[str, list[float | None]]
    """name -> [B] values, None where not applicable or failed"""
    failures: list[tuple[str | None, int, str]] = field(default_factory=list)
    """(function name or None, sample index, what went wrong)"""
    causes: list[BaseException | None] = field(default_factory=list)
    """the exception behind each failure, where there is one (in this process only: not sent between processes)"""
    lost: list[tuple[str, int, str]] = field(default_factory=list)
    """(function name, sample index, what happened) for each sample of a call that never returned (timed out, its
    worker died): failures too, but not evidence that the function fails on each of those samples"""


def score_partial(
    specs: list[RewardSpec],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    completion_ids: list[list[int]] | None = None,
) -> PartialScores:
    """Call every reward function on the batch; collect values and per-sample failures, raise nothing that can
    be pinned to a sample (see `score_samples`)."""
    if not specs:
        raise ValueError("score_samples needs at least one reward function")
    batch_size = len(completions)
    kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions, **columns}
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    for key, column in kwargs.items():
        if len(column) != batch_size:
            raise ValueError(f"{key!r} has {len(column)} entries for {batch_size} completions")
    if len({spec.name for spec in specs}) != len(specs):
        raise ValueError(f"reward function names must be unique, got {[spec.name for spec in specs]}")

    partial = PartialScores({})
    calls = [(spec.fn, _unbound(spec.fn, kwargs)) for spec in specs]
    for spec, (_, fn_kwargs), output in zip(specs, calls, _call_all(calls), strict=True):
        if isinstance(output, BaseException):
            values, spec_failures = _values_one_at_a_time(spec, fn_kwargs, output, batch_size)
        else:
            values, spec_failures = _check_values(spec.name, output, batch_size)
        partial.per_function[spec.name] = values
        partial.failures += [(spec.name, failure.index, failure.message) for failure in spec_failures]
        partial.causes += [failure.cause for failure in spec_failures]
    return partial


def finish_scores(
    specs: list[RewardSpec],
    partial: PartialScores,
    prompts: list,
    completions: list,
    on_error: Literal["raise", "skip"] = "raise",
) -> RewardScores:
    """Apply the failure rules of `score_samples` to a batch's partial scores and combine them with the weights."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    batch_size = len(completions)
    per_function = {name: list(values) for name, values in partial.per_function.items()}
    causes = list(partial.causes) + [None] * (len(partial.failures) - len(partial.causes))
    failures = [(*failure, cause) for failure, cause in zip(partial.failures, causes, strict=True)]
    sources = {spec.name: spec.source for spec in specs}
    for spec in specs:  # failing on every sample is a bug in the function, never a reason to skip
        indices = [index for name, index, _, _ in failures if name == spec.name]
        if batch_size > 1 and len(set(indices)) == batch_size:
            _, index, what, cause = next(f for f in failures if f[0] == spec.name)
            what = f"{what} (and on all {batch_size} samples of the batch)"
            raise RewardError(_sample_message(spec.name, index, what, prompts, completions, spec.source)) from cause
    failures += [(*lost, None) for lost in partial.lost]
    for index in range(batch_size):
        if all(values[index] is None for values in per_function.values()):
            if not any(failed == index for _, failed, _, _ in failures):
                failures.append((None, index, f"all of {list(per_function)} returned None", None))

    errors_by_index: dict[int, str] = {}
    failed = {spec.name: 0 for spec in specs}
    for name, index, what, cause in failures:
        message = _sample_message(name, index, what, prompts, completions, sources.get(name or "", ""))
        if on_error == "raise":
            raise RewardError(message) from cause
        errors_by_index.setdefault(index, message)
        if name in failed:
            failed[name] += 1
    scores = _combine(specs, per_function, errors_by_index, batch_size)
    scores.failed = failed
    return scores


def score_samples(
    specs: list[RewardSpec],
    prompts: list,
    completions: list,
    columns: dict[str, list],
    completion_ids: list[list[int]] | None = None,
    on_error: Literal["raise", "skip"] = "raise",
) -> RewardScores:
    """Score B samples with every reward function and combine the results with the specs' weights.

    `prompts`, `completions`: [B] strings or chat message lists; `columns`: dataset column name -> [B] values,
    passed to every function as keyword arguments; `completion_ids`: [B] token-id lists, passed as
    `completion_ids` when given. With on_error="raise" the first failure raises `RewardError`; with "skip" the
    samples a failure is pinned to get a NaN total and are listed in `skipped`/`errors`. A wrong-length or
    non-list output, and a function failing on every sample of a batch (B > 1), are bugs and raise in both
    modes. Functions that raise on the whole batch are called again one sample at a time to find the culprit,
    so they must tolerate being called twice. Runs in this process; `rewards.workers.RewardPool` runs the same
    in Ray actors with timeouts.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    partial = score_partial(specs, prompts, completions, columns, completion_ids)
    return finish_scores(specs, partial, prompts, completions, on_error)


def _combine(
    specs: list[RewardSpec], per_function: dict[str, list[float | None]], errors: dict[int, str], batch_size: int
) -> RewardScores:
    total = []
    for index in range(batch_size):
        if index in errors:
            total.append(math.nan)
            for values in per_function.values():
                values[index] = None
            continue
        scored = [(spec.weight, per_function[spec.name][index]) for spec in specs]
        total.append(math.fsum(weight * value for weight, value in scored if value is not None))
    skipped = sorted(errors)
    return RewardScores(total, per_function, skipped, [errors[index] for index in skipped])


def reward_metrics(scores: RewardScores) -> dict[str, float]:
    """Per-step logging: `reward/mean`, `reward/std` (population) over the scored samples, `reward/skipped`
    (count), and per function `reward/<name>/mean` over its non-None values plus `reward/<name>/count` and
    `reward/<name>/failed` (the skipped samples it failed on).
    A mean or std with no values to average is left out rather than logged as 0 or NaN."""
    metrics: dict[str, float] = {"reward/skipped": float(len(scores.skipped))}
    totals = [value for value in scores.total if not math.isnan(value)]
    if totals:
        mean = math.fsum(totals) / len(totals)
        metrics["reward/mean"] = mean
        metrics["reward/std"] = math.sqrt(math.fsum((value - mean) ** 2 for value in totals) / len(totals))
    for name, values in scores.per_function.items():
        present = [value for value in values if value is not None]
        metrics[f"reward/{name}/count"] = float(len(present))
        if name in scores.failed:
            metrics[f"reward/{name}/failed"] = float(scores.failed[name])
        if present:
            metrics[f"reward/{name}/mean"] = math.fsum(present) / len(present)
    return metrics
