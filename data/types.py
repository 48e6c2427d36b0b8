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
