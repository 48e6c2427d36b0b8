"""The `reasoning_gym` reward: a completion scored by its reasoning-gym task's own checker (`score_answer`).

For rows of `data: {kind: reasoning_gym, ...}` (`data/reasoning_gym.py`): each row's `reasoning_gym` column names
the task, its settings and the item's index, from which the exact entry is regenerated here (so nothing depends on
how JSON or Ray carried the entry's metadata). The answer scored is the content of the completion's last
`<answer>...</answer>` block (the source's default instruction asks for it); a completion without one is scored as
no answer (None), which most tasks score 0.0 (a few give a small format credit, e.g. countdown 0.01).
"""

from __future__ import annotations

from typing import Any

from posttrain.data.reasoning_gym import task_dataset
from posttrain.rewards.combine import completion_text


def _extract(text: str, tag: str | None) -> str | None:
    from reasoning_gym.utils import extract_answer

    return text.strip() if tag is None else extract_answer(text, tag_name=tag)


def _check_entry(spec: Any) -> None:
    keys = ("task", "seed", "size", "config", "index")
    if not isinstance(spec, dict) or any(key not in spec for key in keys):
        raise ValueError(
            f"reasoning_gym reward: the `reasoning_gym` column is {spec!r}; expected a dict with "
            f"{list(keys)} (the rows of data.kind=reasoning_gym have it)"
        )


def reasoning_gym_reward(
    prompts: list,
    completions: list,
    reasoning_gym: list | None = None,
    answer: list | None = None,
    *,
    tag: str | None = "answer",
    **kwargs: Any,
) -> list[float]:
    """The task's `score_answer` of each completion's answer (1.0 right, 0.0 wrong; some tasks give partial credit
    in between, e.g. countdown 0.05 for a valid expression with the wrong value).

    `reasoning_gym` is the dataset column of `data.kind=reasoning_gym` rows; `answer` (when present) is checked
    against the regenerated entry's, so rows made by another reasoning-gym version fail loudly instead of being
    scored against different problems. `tag`: the answer is the last `<tag>...</tag>` block (None: the whole
    completion). An answer the task's checker cannot even parse (it raises) scores 0.0, like any wrong answer.
    """
    if reasoning_gym is None:
        raise TypeError(
            "the reasoning_gym reward needs the dataset column `reasoning_gym` (rows of data.kind=reasoning_gym); "
            f"the columns passed were {sorted(k for k in kwargs if k not in ('completion_ids', 'trainer_state'))}"
        )
    scores = []
    for i, (spec, completion) in enumerate(zip(reasoning_gym, completions, strict=True)):
        _check_entry(spec)
        dataset = task_dataset(spec["task"], spec["seed"], spec["size"], spec["config"])
        entry = dataset[spec["index"]]
        reference = None if entry.get("answer") is None else str(entry["answer"])
        if answer is not None and answer[i] != reference:
            raise ValueError(
                f"reasoning_gym reward: {spec['task']} item {spec['index']} regenerates with answer "
                f"{reference!r} but the row says {answer[i]!r}: the rows were made by another reasoning-gym version"
            )
        given = _extract(completion_text(completion), tag)
        try:
            score = float(dataset.score_answer(given, entry))
        except Exception:  # noqa: BLE001 - the task's checker choking on a malformed answer: a wrong answer
            score = 0.0
        scores.append(score)
    return scores


reasoning_gym_reward.required_columns = ("reasoning_gym",)  # checked against the dataset before any generation
