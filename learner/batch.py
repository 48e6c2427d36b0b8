"""Turn samples + advantages into the padded tensors the learner trains on.

Layout (as in TRL and vLLM-based trainers): prompts are left-padded to a shared width P and completions
right-padded after it, so every completion starts at column P. The learner then runs the LM head only on
completion positions (`token_logprobs(..., completion_start=P)`), and per-token tensors are [B, C].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from posttrain.data.types import Sample


@dataclass
class TrainBatch:
    """B sequences; P = prompt width (left-padded), C = completion width (right-padded); T = P + C."""

    input_ids_BT: torch.Tensor
    attention_mask_BT: torch.Tensor
    loss_mask_BC: torch.Tensor
    """1 on completion tokens that carry loss (0 on padding and on skipped samples)"""
    advantages_B: torch.Tensor
    sampler_logprobs_BC: torch.Tensor
    """the rollout engine's log-prob of each completion token (0 on padding)"""
    prompt_lengths_B: torch.Tensor
    completion_lengths_B: torch.Tensor
    max_completion_tokens: int
    """the rollout's max_new_tokens (the fixed normaliser of seq-mean-token-sum-norm)"""
    token_advantages_BC: torch.Tensor | None = None
    """per-token advantages (REINFORCE++); when set they replace `advantages_B`"""
    old_logprobs_BC: torch.Tensor | None = None
    """lp_old: the learner's log-probs before this rollout batch's first update (None: the learner computes them)"""
    ref_logprobs_BC: torch.Tensor | None = None
    """the reference model's log-probs (None: the learner computes them if it has a reference)"""
    teacher_logprobs_BC: torch.Tensor | None = None
    """on-policy distillation: the teacher's log-prob of each completion token (0 on padding)"""
    old_values_BC: torch.Tensor | None = None
    """PPO: the critic's values of each completion token before this rollout batch's updates (0 on padding)"""
    returns_BC: torch.Tensor | None = None
    """PPO: the GAE returns the critic regresses on (0 on padding)"""

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def prompt_width(self) -> int:
        return self.input_ids_BT.shape[1] - self.loss_mask_BC.shape[1]

    @property
    def advantages(self) -> torch.Tensor:
        """[B, C] token advantages when the batch has them, else the [B] sequence advantages."""
        return self.advantages_B if self.token_advantages_BC is None else self.token_advantages_BC

    def slice(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop), trimmed to their own longest prompt and completion (padding columns dropped)."""
        P = self.prompt_width
        p = int(self.prompt_lengths_B[start:stop].max())
        c = max(1, int(self.completion_lengths_B[start:stop].max()))
        columns = slice(P - p, P + c)

        def rows_bc(x_BC: torch.Tensor | None) -> torch.Tensor | None:
            return None if x_BC is None else x_BC[start:stop, :c]

        return TrainBatch(
            input_ids_BT=self.input_ids_BT[start:stop, columns],
            attention_mask_BT=self.attention_mask_BT[start:stop, columns],
            loss_mask_BC=self.loss_mask_BC[start:stop, :c],
            advantages_B=self.advantages_B[start:stop],
            sampler_logprobs_BC=self.sampler_logprobs_BC[start:stop, :c],
            prompt_lengths_B=self.prompt_lengths_B[start:stop],
            completion_lengths_B=self.completion_lengths_B[start:stop],
            max_completion_tokens=self.max_completion_tokens,
            token_advantages_BC=rows_bc(self.token_advantages_BC),
            old_logprobs_BC=rows_bc(self.old_logprobs_BC),
            ref_logprobs_BC=rows_bc(self.ref_logprobs_BC),
            teacher_logprobs_BC=rows_bc(self.teacher_logprobs_BC),
            old_values_BC=rows_bc(self.old_values_BC),
            returns_BC=rows_bc(self.returns_BC),
        )


def collate(
    samples: list[Sample], advantages: list[float], pad_token_id: int, max_completion_tokens: int
) -> TrainBatch:
    """Pack samples into a `TrainBatch` (prompts left-padded, completions right-padded).

    A sample whose advantage is NaN (its reward was skipped) stays in the batch with an all-zero loss mask, so
    batch shapes do not depend on failures. Completion tokens include EOS when the model stopped by itself. A sample
    with a `completion_mask` (a multi-turn episode) has loss only where it is 1.
    """
    if len(samples) != len(advantages):
        raise ValueError(f"collate: {len(samples)} samples but {len(advantages)} advantages")
    prompt_lengths = [len(s.prompt_token_ids) for s in samples]
    completion_lengths = [len(s.completion_token_ids) for s in samples]
    B, P, C = len(samples), max(prompt_lengths), max(1, max(completion_lengths))
    input_ids = torch.full((B, P + C), pad_token_id, dtype=torch.long)
    attention = torch.zeros((B, P + C), dtype=torch.long)
    loss_mask = torch.zeros((B, C), dtype=torch.float32)
    sampler_lp = torch.zeros((B, C), dtype=torch.float32)
    adv = torch.zeros(B, dtype=torch.float32)
    for i, (s, a) in enumerate(zip(samples, advantages, strict=True)):
        p, c = prompt_lengths[i], completion_lengths[i]
        input_ids[i, P - p : P] = torch.tensor(s.prompt_token_ids, dtype=torch.long)
        input_ids[i, P : P + c] = torch.tensor(s.completion_token_ids, dtype=torch.long)
        attention[i, P - p : P + c] = 1
        sampler_lp[i, :c] = torch.tensor(s.sampler_logprobs, dtype=torch.float32)
        if s.completion_mask is not None and len(s.completion_mask) != c:
            raise ValueError(f"collate: sample {i} has {c} completion tokens but a mask of {len(s.completion_mask)}")
        if c and a == a:  # a != a only for NaN
            # an environment episode's own tokens only (its tool output and feedback carry no loss)
            loss_mask[i, :c] = 1.0 if s.completion_mask is None else torch.tensor(s.completion_mask)
            adv[i] = a
    return TrainBatch(
        input_ids,
        attention,
        loss_mask,
        adv,
        sampler_lp,
        torch.tensor(prompt_lengths),
        torch.tensor(completion_lengths),
        max_completion_tokens,
    )


def micro_batches(batch: TrainBatch, max_rows: int, max_tokens: int | None = None) -> list[TrainBatch]:
    """The micro-batches one pass over `batch` runs, each trimmed to its own longest prompt and completion.

    `max_tokens` None: contiguous runs of `max_rows` rows. Else the rows sorted by length (`length_buckets`) and cut
    where `max_rows` rows or `max_tokens` padded tokens would be exceeded, so rows of similar length share a
    micro-batch and less padding is computed. The step's loss is the same either way (its normalisers are the whole
    step's; every row's terms are its own), up to float summation order.
    """
    if max_tokens is None:
        return [batch.slice(lo, lo + max_rows) for lo in range(0, len(batch), max_rows)]
    order, bounds = length_buckets(
        batch.prompt_lengths_B.tolist(), batch.completion_lengths_B.tolist(), max_rows, max_tokens
    )
    ordered = select_rows(batch, order)
    return [ordered.slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def length_buckets(
    prompt_lengths: Sequence[int], completion_lengths: Sequence[int], max_rows: int, max_tokens: int
) -> tuple[list[int], list[int]]:
    """(row order, bounds): rows sorted by (completion, prompt) length, then cut greedily into runs whose padded
    size, rows x (longest prompt + longest completion), stays within `max_tokens` and whose rows within `max_rows`.
    A row longer than `max_tokens` on its own gets a run of its own. `bounds` = `[0, ..., len(rows)]`."""
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"length_buckets: max_rows and max_tokens must be >= 1, got {max_rows} and {max_tokens}")
    order = sorted(range(len(prompt_lengths)), key=lambda i: (completion_lengths[i], prompt_lengths[i]))
    bounds, p, c = [0], 0, 0
    for k, i in enumerate(order):
        rows = k - bounds[-1]
        # a micro-batch's widths: its longest prompt, its longest completion (at least 1, as `TrainBatch.slice`)
        wide_p, wide_c = max(p, prompt_lengths[i]), max(c, completion_lengths[i], 1)
        if rows and (rows + 1 > max_rows or (rows + 1) * (wide_p + wide_c) > max_tokens):
            bounds.append(k)
            wide_p, wide_c = prompt_lengths[i], max(completion_lengths[i], 1)
        p, c = wide_p, wide_c
    if order:
        bounds.append(len(order))
    return order, bounds


def select_rows(batch: TrainBatch, rows: Sequence[int]) -> TrainBatch:
    """The batch's `rows` (any order, possibly none), at the full widths: no padding column is dropped, so a
    data-parallel rank's share keeps the layout of the whole batch."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return _map_tensors(batch, lambda x: x.index_select(0, index.to(x.device)))


def batch_to(batch: TrainBatch, device: torch.device | str) -> TrainBatch:
    """The same batch with every tensor on `device` (the learner's; no copy for tensors already there)."""
    return _map_tensors(batch, lambda x: x.to(device))


def _map_tensors(batch: TrainBatch, fn) -> TrainBatch:
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    return TrainBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})
