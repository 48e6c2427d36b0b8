"""reasoning-gym tasks as a prompt source (`data: {kind: reasoning_gym, task: chain_sum, size: 500}`).

reasoning-gym (PyPI `reasoning-gym`) generates problems procedurally and offline: item `i` of a task is a pure
function of (task, config, seed, i). So a row does not carry the entry itself (its metadata holds tuples and other
things JSON and Ray turn into something else) but the recipe of it: the `reasoning_gym` column is
`{task, seed, size, config, index}`, plain JSON, and the `reasoning_gym` reward regenerates the exact entry from it to
call the task's own `score_answer`. The entry's metadata is kept too (`metadata`, made JSON-safe) for inspection.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from posttrain.config import ReasoningGymSource

INSTALL = "pip install reasoning-gym==0.1.25"


class ReasoningGymError(ValueError):
    """reasoning-gym is missing, or a task name or setting is wrong; the message says which and how to fix it."""


def _create_dataset():
    try:
        from reasoning_gym import create_dataset
    except ImportError:
        raise ReasoningGymError(
            f"data.kind=reasoning_gym (and the reasoning_gym reward) need the reasoning-gym package: {INSTALL} "
            "(or pip install 'posttrain[envs]')"
        ) from None
    return create_dataset


def task_names() -> list[str]:
    """The task families this reasoning-gym version registers."""
    _create_dataset()
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


@functools.lru_cache(maxsize=64)
def _dataset(task: str, seed: int, size: int, config_json: str) -> Any:
    create_dataset = _create_dataset()
    if task not in task_names():
        raise ReasoningGymError(f"data.task = {task!r}: not a reasoning-gym task; tasks: {', '.join(task_names())}")
    config = json.loads(config_json)
    taken = sorted({"seed", "size"} & set(config))
    if taken:
        raise ReasoningGymError(f"data.config: set {taken} as data.seed / data.size, not inside data.config")
    try:
        return create_dataset(task, seed=seed, size=size, **config)
    except (TypeError, ValueError, AssertionError) as error:
        raise ReasoningGymError(f"data.config = {config!r}: reasoning-gym task {task!r} refused it: {error}") from None


def task_dataset(task: str, seed: int, size: int, config: dict[str, Any]) -> Any:
    """The reasoning-gym dataset (`ds[i]` is entry i: `question`, `answer`, `metadata`; `ds.score_answer`), cached
    per process (building one is cheap, entries are generated on access)."""
    return _dataset(task, seed, size, json.dumps(config, sort_keys=True))


def json_safe(value: Any) -> Any:
    """`value` as JSON turns it (tuples become lists, other objects their `str`), so the row is the same before
    and after a run folder, a JSONL file or Ray."""
    return json.loads(json.dumps(value, default=str))


def reasoning_gym_rows(src: ReasoningGymSource) -> list[dict[str, Any]]:
    """`src.size` rows: `prompt` (the question + `src.instruction`), `answer` (the task's reference answer, a string
    or None), `reasoning_gym` (what regenerates the entry) and `metadata` (the entry's, JSON-safe)."""
    dataset = task_dataset(src.task, src.seed, src.size, src.config)
    made_by = {"task": src.task, "seed": src.seed, "size": src.size, "config": json_safe(src.config)}
    rows = []
    for index in range(src.size):
        entry = dataset[index]
        answer = entry.get("answer")
        rows.append(
            {
                "prompt": entry["question"] + src.instruction,
                "answer": None if answer is None else str(answer),
                "reasoning_gym": {**made_by, "index": index},
                "metadata": json_safe(entry.get("metadata", {})),
            }
        )
    return rows
