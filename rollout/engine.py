"""The interface every inference engine implements (`hf` = transformers `generate`, `vllm` = vLLM).

An engine holds one policy's weights and turns prompts into completions. Prompts arrive either as text that is
already chat-templated (`posttrain.models.loading.format_prompt`; tokenized here with `add_special_tokens=False`) or
as token ids. Weights arrive as (partial) state dicts in the plain Hugging Face model's tensor names, which is what a
learner produces with `model.state_dict()` or, for LoRA, `posttrain.models.lora.merged_state_dict`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence

import torch

from posttrain.rollout.types import PromptResult, SamplingParams

Prompts = Sequence[str] | Sequence[Sequence[int]]


class InferenceEngine(ABC):
    """Generates completions with the current policy weights; weights are replaced in place by `load_weights`."""

    @property
    @abstractmethod
    def tokenizer(self):
        """The model's tokenizer (a `PreTrainedTokenizerBase`)."""

    @abstractmethod
    def generate(self, prompts: Prompts, params: SamplingParams) -> list[PromptResult]:
        """Sample `params.n` completions for each prompt.

        Args:
            prompts: P chat-templated strings (tokenized with `add_special_tokens=False`) or P lists of token ids.
            params: how to sample; `params.seed` makes the call reproducible on the same engine and weights.
        Returns:
            P results in prompt order, each with `params.n` completions whose `token_ids` and `logprobs` have the same
            length (at most `params.max_new_tokens`).
        """

    @abstractmethod
    def load_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Replace the named tensors (a full or partial state dict, plain HF names); the others stay as they are.

        Raises ValueError naming the tensor for an unknown name or a shape mismatch, before anything is changed.
        """

    @abstractmethod
    def get_weights(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """CPU copies of the named tensors (all of them when `names` is None), in plain HF names."""

    def sleep(self, level: int) -> None:
        """Free the engine's accelerator memory until `wake_up` (`rollout.sleep_level`): level 1 offloads the weights
        to CPU memory and drops the KV cache, level 2 drops both. `generate` raises RuntimeError until woken."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring back what `sleep` freed: the `SLEEP_TAGS` in `tags` (None: all), e.g. "weights" before a weight
        sync and "kv_cache" after it; a no-op for what is awake."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep")

    @property
    def is_sleeping(self) -> bool:
        """True from `sleep` until every tag is awake again."""
        return False


SLEEP_TAGS = ("weights", "kv_cache")
"""what `InferenceEngine.wake_up` brings back, by name (vLLM's tags)"""


def check_sleep_level(level: int) -> None:
    if level not in (1, 2):
        raise ValueError(f"sleep level must be 1 (offload the weights) or 2 (drop them), got {level!r}")


def wake_tags(tags: Sequence[str] | None) -> list[str]:
    """`tags` checked against `SLEEP_TAGS` (None: all of them), in `SLEEP_TAGS`' order."""
    wanted = list(SLEEP_TAGS) if tags is None else list(tags)
    unknown = [tag for tag in wanted if tag not in SLEEP_TAGS]
    if unknown:
        raise ValueError(f"unknown wake_up tags {unknown}; allowed: {', '.join(SLEEP_TAGS)}")
    return [tag for tag in SLEEP_TAGS if tag in wanted]


def tokenize_prompts(tokenizer, prompts: Prompts) -> list[list[int]]:
    """Token ids of each prompt: strings are encoded without adding special tokens, id lists are copied.

    Raises ValueError for an empty prompt (a sequence of padding alone has nothing to condition on).
    """
    if not prompts:
        return []
    if all(isinstance(prompt, str) for prompt in prompts):
        ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    elif any(isinstance(prompt, str) for prompt in prompts):
        raise ValueError("prompts must be all strings or all lists of token ids, not a mix")
    else:
        ids = [[int(token) for token in prompt] for prompt in prompts]
    for i, prompt_ids in enumerate(ids):
        if not prompt_ids:
            raise ValueError(f"prompt {i} is empty")
    return ids


def check_weight_update(shapes: Mapping[str, torch.Size], weights: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first tensor of `weights` that the model lacks or whose shape differs.

    Args:
        shapes: the model's tensor shapes by name.
        weights: the update, by name.
    """
    for name, tensor in weights.items():
        if name not in shapes:
            hint = ", ".join(list(shapes)[:3])
            raise ValueError(f"unknown weight {name!r}: the model has no tensor of that name (it has e.g. {hint})")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(
                f"shape mismatch for weight {name!r}: got {tuple(tensor.shape)}, the model has {tuple(shapes[name])}"
            )
