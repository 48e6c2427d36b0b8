"""Turn samples + advantages into the padded tensors the learner trains on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.data.types import Sample


@dataclass
class TrainBatch:
    """Right-padded prompt+completion sequences. B = sequences, T = longest prompt+completion."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BT: torch.Tensor
    """1 on completion tokens that carry loss (0 on prompt, padding and skipped samples)"""
    advantages_B: torch.Tensor
    sampler_logprobs_BT: torch.Tensor
    """the rollout engine's log-prob of each completion token, aligned with input_ids (0 elsewhere)"""
    max_completion_tokens: int
    """the rollout's max_new_tokens (the fixed normaliser of seq-mean-token-sum-norm)"""

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    def slice(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop), with columns trimmed to the longest sequence among them."""
        width = int(self.attention_mask_BT[start:stop].sum(-1).max())
        return TrainBatch(
            input_ids_BT=self.input_ids_BT[start:stop, :width],
            attention_mask_BT=self.attention_mask_BT[start:stop, :width],
            loss_mask_BT=self.loss_mask_BT[start:stop, :width],
            advantages_B=self.advantages_B[start:stop],
            sampler_logprobs_BT=self.sampler_logprobs_BT[start:stop, :width],
            max_completion_tokens=self.max_completion_tokens,
        )


def collate(
    samples: list[Sample], advantages: list[float], pad_token_id: int, max_completion_tokens: int
) -> TrainBatch:
    """Pack samples into a right-padded `TrainBatch`.

    A sample whose advantage is NaN (its reward was skipped) stays in the batch with an all-zero loss mask, so
    batch shapes do not depend on failures. Completion tokens include EOS when the model stopped by itself.
    """
    if len(samples) != len(advantages):
        raise ValueError(f"collate: {len(samples)} samples but {len(advantages)} advantages")
    lengths = [len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples]
    B, T = len(samples), max(lengths)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.float32)
    sampler_lp = torch.zeros((B, T), dtype=torch.float32)
    adv = torch.zeros(B, dtype=torch.float32)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        p, c = len(s.prompt_token_ids), len(s.completion_token_ids)
        input_ids[i, : p + c] = torch.tensor(s.prompt_token_ids + s.completion_token_ids, dtype=torch.long)
        attention[i, : p + c] = 1
        if c and a == a:  # a != a only for NaN
            loss_mask[i, p : p + c] = 1.0
            adv[i] = a
        sampler_lp[i, p : p + c] = torch.tensor(s.sampler_logprobs, dtype=torch.float32)
    return TrainBatch(input_ids, attention, loss_mask, adv, sampler_lp, max_completion_tokens)
