"""A training sample as it flows from rollout to rewards to the learner."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One completion of one prompt, with everything rewards and the learner need."""

    prompt: str
    """the dataset prompt (before the chat template)"""
    prompt_token_ids: list[int]
    """prompt tokens after the chat template, as the engine saw them"""
    completion: str
    completion_token_ids: list[int]
    sampler_logprobs: list[float]
    finish_reason: str
    group_id: int
    """index of the prompt within the step; samples of one prompt share it"""
    columns: dict[str, Any] = field(default_factory=dict)
    """the dataset row's other columns (gold answers, tests, ...), passed to reward functions"""
    completion_mask: list[int] | None = None
    """1 on the completion tokens that carry loss, 0 on the others (an environment episode's tool output and
    feedback, `posttrain.envs`); None: every completion token does"""
    episode: dict[str, Any] | None = None
    """an environment episode's outcome (turns, finish, error, step rewards) for the logs; None for a completion"""


def columns_of(samples: list[Sample]) -> dict[str, list]:
    """The samples' dataset columns as reward functions take them, TRL style: column name -> [B] values (None where
    a sample's row lacks the column)."""
    return {key: [s.columns.get(key) for s in samples] for key in sorted({k for s in samples for k in s.columns})}
