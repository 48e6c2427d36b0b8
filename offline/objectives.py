"""The per-micro-batch objective of each offline method: batch the rows, run the model, call the pure loss.

The math lives in `algorithms/losses/` (sft_nll, dpo_*, orpo, bradley_terry); this module only turns tokenized rows
into the tensors those functions take, and scales each micro-batch's loss so that the micro-batch losses of one
optimizer step add up to the loss of the whole step (token mean over the step for SFT, mean over the step's pairs
for the others): 1 x 8 and 8 x 1 accumulation give the same gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from posttrain.algorithms.losses import (
    bradley_terry,
    dpo_hinge,
    dpo_ipo,
    dpo_robust,
    dpo_sigmoid,
    orpo,
    sequence_logprob,
    sft_nll,
)
from posttrain.models.logprobs import token_logprobs
from posttrain.offline.data import PreferencePair, Sequence


@dataclass
class PaddedBatch:
    """Right-padded sequences: `input_ids_BT`, `attention_mask_BT` and `loss_mask_BT` (0 on column 0 and padding);
    `position_ids_BT` for packed rows (positions restart per packed sequence and run on through the padding)."""

    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    loss_mask_BT: Tensor
    position_ids_BT: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids_BT.shape[0]


def collate(sequences: list[Sequence], pad_id: int) -> PaddedBatch:
    """Pad on the right to the longest sequence; column t of the loss mask marks whether token t is supervised."""
    width = max(len(s.input_ids) for s in sequences)
    ids_BT = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_BT = torch.zeros((len(sequences), width), dtype=torch.long)
    loss_BT = torch.zeros((len(sequences), width), dtype=torch.float32)
    for i, seq in enumerate(sequences):
        n = len(seq.input_ids)
        ids_BT[i, :n] = torch.tensor(seq.input_ids)
        attention_BT[i, :n] = 1
        loss_BT[i, :n] = torch.tensor(seq.loss_mask, dtype=torch.float32)
    loss_BT[:, 0] = 0  # token 0 has no prediction
    if sequences[0].position_ids is None:
        return PaddedBatch(ids_BT, attention_BT, loss_BT)
    positions_BT = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq.position_ids)
        positions_BT[i, :n] = torch.tensor(seq.position_ids)
        positions_BT[i, n:] = torch.arange(seq.position_ids[-1] + 1, seq.position_ids[-1] + 1 + width - n)
    return PaddedBatch(ids_BT, attention_BT, loss_BT, positions_BT)


def pair_batch(pairs: list[PreferencePair], pad_id: int) -> PaddedBatch:
    """The chosen sequences, then the rejected ones, in one padded batch of 2 * len(pairs) rows (one forward)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def logprobs(model: nn.Module, batch: PaddedBatch) -> Tensor:
    """[B, T] log-probs of each token (0 at column 0 and padding), with gradient unless called under no_grad."""
    lp_BT, _ = token_logprobs(
        model, batch.input_ids_BT, batch.attention_mask_BT, with_entropy=False, position_ids_BT=batch.position_ids_BT
    )
    return lp_BT


# ------------------------------------------------------------------------------------------------ SFT


def sft_micro_loss(
    model: nn.Module, sequences: list[Sequence], pad_id: int, step_tokens: float
) -> tuple[Tensor, dict[str, float], float]:
    """SFT NLL of a micro-batch normalised by the supervised tokens of the whole step; (loss, metrics, weight)."""
    batch = collate(sequences, pad_id)
    loss, metrics = sft_nll(logprobs(model, batch), batch.loss_mask_BT, num_tokens=step_tokens)
    return loss, {"nll": metrics["nll"]}, metrics["num_tokens"]


# ------------------------------------------------------------------------------------------------ DPO


@dataclass
class DPOSettings:
    beta: float
    loss_type: str
    label_smoothing: float = 0.0


def dpo_loss_fn(settings: DPOSettings) -> Callable:
    """`fn(pi_c, pi_r, ref_c, ref_r, len_c, len_r) -> (loss, metrics)` for the configured variant."""
    beta, eps = settings.beta, settings.label_smoothing
    variants = {
        "sigmoid": lambda pc, pr, rc, rr, lc, lr: dpo_sigmoid(pc, pr, rc, rr, beta),
        "hinge": lambda pc, pr, rc, rr, lc, lr: dpo_hinge(pc, pr, rc, rr, beta),
        "robust": lambda pc, pr, rc, rr, lc, lr: dpo_robust(pc, pr, rc, rr, beta, eps),
        "ipo": lambda pc, pr, rc, rr, lc, lr: dpo_ipo(pc, pr, rc, rr, beta, lc, lr),
    }
    if settings.loss_type not in variants:
        raise ValueError(f"unknown DPO loss_type {settings.loss_type!r}; allowed: {', '.join(variants)}")
    return variants[settings.loss_type]


def pair_sequence_logprobs(model: nn.Module, batch: PaddedBatch) -> tuple[Tensor, Tensor]:
    """(S(y_c), S(y_r)), each [pairs]: summed completion log-probs of a `pair_batch`."""
    seq_2B = sequence_logprob(logprobs(model, batch), batch.loss_mask_BT)
    return seq_2B.chunk(2)


def reference_context(model: nn.Module, ref_model: nn.Module | None):
    """(context manager, model) that computes reference log-probs: the frozen copy, or the policy with LoRA off."""
    if ref_model is not None:
        return contextlib.nullcontext(), ref_model
    return model.disable_adapter(), model


@torch.no_grad()
def reference_logprobs(model: nn.Module, ref_model: nn.Module | None, pairs: list[PreferencePair], pad_id: int):
    """(S_ref(y_c), S_ref(y_r)) of the pairs, [pairs] each; `ref_model=None` means the policy with LoRA off."""
    ctx, ref = reference_context(model, ref_model)
    with ctx:
        return pair_sequence_logprobs(ref, pair_batch(pairs, pad_id))


def dpo_micro_loss(
    model: nn.Module,
    pairs: list[PreferencePair],
    ref_logps: tuple[Tensor, Tensor],
    loss_fn: Callable,
    pad_id: int,
    step_pairs: int,
) -> tuple[Tensor, dict[str, float], float]:
    """DPO loss of a micro-batch scaled by its share of the step's pairs; `ref_logps` = (S_ref(y_c), S_ref(y_r))."""
    batch = pair_batch(pairs, pad_id)
    pi_c_B, pi_r_B = pair_sequence_logprobs(model, batch)
    len_c_B, len_r_B = batch.loss_mask_BT.sum(-1).chunk(2)
    loss, metrics = loss_fn(pi_c_B, pi_r_B, ref_logps[0], ref_logps[1], len_c_B, len_r_B)
    metrics["logps/chosen"] = float(pi_c_B.detach().mean())
    metrics["logps/rejected"] = float(pi_r_B.detach().mean())
    return loss * (len(pairs) / step_pairs), metrics, float(len(pairs))


# ------------------------------------------------------------------------------------------------ ORPO


def orpo_micro_loss(
    model: nn.Module, pairs: list[PreferencePair], lam: float, pad_id: int, step_pairs: int
) -> tuple[Tensor, dict[str, float], float]:
    """ORPO loss of a micro-batch (no reference) scaled by its share of the step's pairs."""
    batch = pair_batch(pairs, pad_id)
    lp_c_BT, lp_r_BT = logprobs(model, batch).chunk(2)
    mask_c_BT, mask_r_BT = batch.loss_mask_BT.chunk(2)
    loss, metrics = orpo(lp_c_BT, mask_c_BT, lp_r_BT, mask_r_BT, lam=lam)
    return loss * (len(pairs) / step_pairs), metrics, float(len(pairs))


# ------------------------------------------------------------------------------------------------ reward model


def reward_scores(model: nn.Module, batch: PaddedBatch) -> Tensor:
    """[B] scalar scores of a sequence-classification model (read by transformers at the last non-pad token)."""
    output = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False)
    return output.logits.squeeze(-1).float()


def reward_model_micro_loss(
    model: nn.Module, pairs: list[PreferencePair], center_coef: float, pad_id: int, step_pairs: int
) -> tuple[Tensor, dict[str, float], float]:
    """Bradley-Terry loss (with each pair's margin, if any) scaled by the micro-batch's share of the step's pairs."""
    scores_2B = reward_scores(model, pair_batch(pairs, pad_id))
    chosen_B, rejected_B = scores_2B.chunk(2)
    margins = [p.margin for p in pairs]
    margin_B = None if margins[0] is None else torch.tensor(margins, dtype=chosen_B.dtype)
    loss, metrics = bradley_terry(chosen_B, rejected_B, margin_B, center_coef)
    return loss * (len(pairs) / step_pairs), metrics, float(len(pairs))
