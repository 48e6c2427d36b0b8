"""Data that crosses the rollout boundary: sampling parameters in, completions out.

Every engine (transformers `generate`, vLLM) takes `SamplingParams` and returns one
`PromptResult` per prompt. These are plain dataclasses so they pickle cheaply through Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy decoding."""

    n: int = 1
    """completions per prompt"""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k"""
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    """strings that end a completion (the string itself is kept in the text and tokens)"""
    seed: int | None = None
    """makes the call reproducible on the same engine and weights"""

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    """generated tokens, including the EOS token when the model stopped by itself"""
    text: str
    """decoded `token_ids` without special tokens"""
    logprobs: list[float]
    """the sampler's log-prob of each token in `token_ids`, from logits / temperature (raw logits when greedy)"""
    finish_reason: FinishReason


@dataclass
class PromptResult:
    """All completions of one prompt."""

    prompt_token_ids: list[int]
    completions: list[Completion] = field(default_factory=list)
