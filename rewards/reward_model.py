"""`reward_model`: score prompt + completion with a sequence-classification model, batched, in a Ray actor.

Recipe use (any `AutoModelForSequenceClassification` folder with one output, e.g. what `algorithm.name:
reward_model` training writes):

    rewards:
      - fn: reward_model
        args: {model: runs/rm-.../final, batch_size: 16}

The model runs in one Ray actor per (model, dtype, device) and per Ray job, shared by every reward worker that
asks for it (a named actor, `rewards.shared_actor`), so it is loaded once and its batches are padded and run
together. Outside Ray (e.g. `posttrain eval` in one process) the same scorer runs in this process.

Text scored: the conversation (the prompt's messages, then the completion as the assistant turn) through the
tokenizer's chat template, or prompt + completion + EOS for a tokenizer without one — `reward_model_text`, the
text reward-model training builds too, so a trained model is scored on the text it was trained on.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from posttrain.rewards.combine import completion_text
from posttrain.rewards.shared_actor import actor_name, call_shared_actor

_ACTOR_PREFIX = "posttrain-reward-model-"


def reward_model_text(tokenizer: Any, prompt: str | list[dict], completion: str) -> str:
    """The text a reward model scores for one (prompt, completion) pair (see the module docstring); the same text
    reward-model training builds (`offline.data.ChatTokenizer`): the conversation through the chat template, or
    without one the prompt, the completion and the EOS token."""
    from posttrain.models.loading import chat_messages, default_bos, format_prompt

    if not tokenizer.chat_template:
        return format_prompt(tokenizer, prompt, use_chat_template=False) + completion + (tokenizer.eos_token or "")
    messages = [*chat_messages(prompt), {"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    bos = default_bos(tokenizer)
    return text if bos is None or text.startswith(bos) else bos + text


class RewardModelScorer:
    """A loaded sequence-classification model with one output; `score(prompts, completions)` -> floats."""

    def __init__(self, path: str, dtype: str = "float32", device: str = "auto", max_length: int = 2048):
        import torch
        from transformers import AutoModelForSequenceClassification

        from posttrain.models.loading import load_tokenizer, resolve_model_path, torch_dtype

        resolved = resolve_model_path(path)
        if not os.path.isdir(resolved):
            raise FileNotFoundError(f"reward_model: model folder {path!r} does not exist")
        self.tokenizer = load_tokenizer(resolved, padding_side="right")
        self.model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=torch_dtype(dtype))
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward_model: {path!r} has {self.model.config.num_labels} outputs (num_labels); a reward model "
                "has exactly one"
            )
        if self.model.config.pad_token_id is None:  # it finds each sequence's last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model.to(self.device).eval()
        self.max_length = max_length
        if self.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)  # Ray actors start with one thread

    def ready(self) -> int:
        return os.getpid()

    def score(self, prompts: list, completions: list[str], batch_size: int = 16) -> list[float]:
        import torch

        texts = [reward_model_text(self.tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
        scores = [0.0] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in chunk],
                    add_special_tokens=False,
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.model(**batch).logits.float()[:, 0]
                for i, value in zip(chunk, logits.tolist(), strict=True):
                    scores[i] = value
        return scores


@functools.cache
def _local_scorer(path: str, dtype: str, device: str, max_length: int) -> RewardModelScorer:
    return RewardModelScorer(path, dtype, device, max_length)


def reward_model(
    prompts: list,
    completions: list,
    *,
    model: str,
    batch_size: int = 16,
    dtype: str = "float32",
    device: str = "auto",
    max_length: int = 2048,
    num_gpus: float = 0,
    **kwargs: Any,
) -> list[float]:
    """The reward model's score (its single logit) for each completion; `model` is its folder."""
    import ray

    texts = [completion_text(c) for c in completions]
    path = os.path.abspath(model) if os.path.isdir(model) else model
    if not ray.is_initialized():
        return _local_scorer(path, dtype, device, max_length).score(prompts, texts, batch_size)
    settings = (path, dtype, device, max_length)
    return call_shared_actor(
        actor_name(_ACTOR_PREFIX, settings),
        ray.remote(RewardModelScorer),
        settings,
        num_gpus,
        "score",
        prompts,
        texts,
        batch_size,
        what=f"reward_model {model!r}",
    )
