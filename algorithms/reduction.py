"""Reduce a per-token loss `L_BT` with its mask `m_BT` to the scalar that is back-propagated.

Three choices, named in the config (`algorithm.loss_reduction`):
  - `"token-mean"`:              sum(L*m) / num_tokens                   (DAPO 2503.14476, token-level loss);
  - `"seq-mean-token-mean"`:     sum_i(sum_t(L*m) / |o_i|) / num_seqs    (original GRPO, 2402.03300 eq. 3);
  - `"seq-mean-token-sum-norm"`: sum(L*m) / (num_seqs * max_completion_tokens)   (Dr. GRPO, 2503.20783).

Micro-batch invariance: the normalisers are arguments, counted over the *whole optimizer step* (all
micro-batches on all data-parallel ranks). Each micro-batch then returns its share, and the shares simply add
up to the full-batch value; so do their gradients. Summing `loss.backward()` over micro-batches is therefore
exact (data-parallel ranks that average gradients must instead multiply by the world size, or pass normalisers
divided by it). Left as `None`, a normaliser is this call's own value, which is right only when the call sees
the whole step:
  - `num_tokens`: the number of masked tokens here;
  - `num_seqs`: the number of rows here with at least one masked token (padding rows and skipped samples
    with an all-zero mask are not sequences being trained on);
  - `max_completion_tokens`: the longest masked row here. Dr. GRPO's constant is the generation budget
    (`max_new_tokens`); pass it, or the normaliser depends on the batch again.

Masking uses `torch.where`, so NaN/inf in `L` at masked positions does not reach the value.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from posttrain.algorithms.masked import masked_sum

ReductionMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def token_mean(loss_BT: Tensor, mask_BT: Tensor, num_tokens: float | None = None) -> Tensor:
    """sum(L*m) / num_tokens: every token of the step weighs the same, whatever its sequence's length."""
    if num_tokens is None:
        num_tokens = max(float(_counts(mask_BT).sum()), 1.0)
    _check_positive(num_tokens=num_tokens)
    return masked_sum(loss_BT, mask_BT) / num_tokens


def seq_mean_token_mean(loss_BT: Tensor, mask_BT: Tensor, num_seqs: int | None = None) -> Tensor:
    """sum_i(sum_t(L*m) / |o_i|) / num_seqs: every sequence weighs the same; rows with no tokens add 0."""
    lengths_B = _counts(mask_BT)
    if num_seqs is None:
        num_seqs = max(int((lengths_B > 0).sum()), 1)
    _check_positive(num_seqs=num_seqs)
    per_seq_B = masked_sum(loss_BT, mask_BT, dim=-1) / lengths_B.clamp(min=1)
    return per_seq_B.sum() / num_seqs


def seq_mean_token_sum_norm(
    loss_BT: Tensor, mask_BT: Tensor, num_seqs: int | None = None, max_completion_tokens: int | None = None
) -> Tensor:
    """sum(L*m) / (num_seqs * max_completion_tokens): a constant normaliser, so no length bias (Dr. GRPO)."""
    lengths_B = _counts(mask_BT)
    if num_seqs is None:
        num_seqs = max(int((lengths_B > 0).sum()), 1)
    if max_completion_tokens is None:
        max_completion_tokens = max(int(lengths_B.max()) if lengths_B.numel() else 0, 1)
    _check_positive(num_seqs=num_seqs, max_completion_tokens=max_completion_tokens)
    return masked_sum(loss_BT, mask_BT) / (num_seqs * max_completion_tokens)


def reduce_loss(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: ReductionMode,
    *,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    max_completion_tokens: int | None = None,
) -> Tensor:
    """Reduce the per-token `loss_BT` [batch, tokens] under `mask_BT` (bool or 0/1, same shape) as `mode` says.

    Returns a 0-dim tensor (with gradient). The keyword normalisers are for the whole optimizer step; the ones a
    mode does not use are ignored, so a caller can always pass all three. See the module docstring.
    """
    if loss_BT.dim() != 2 or loss_BT.shape != mask_BT.shape:
        raise ValueError(
            f"reduce_loss: expected [batch, tokens] loss and mask of one shape, got {tuple(loss_BT.shape)} "
            f"and {tuple(mask_BT.shape)}"
        )
    if mode == "token-mean":
        return token_mean(loss_BT, mask_BT, num_tokens)
    if mode == "seq-mean-token-mean":
        return seq_mean_token_mean(loss_BT, mask_BT, num_seqs)
    if mode == "seq-mean-token-sum-norm":
        return seq_mean_token_sum_norm(loss_BT, mask_BT, num_seqs, max_completion_tokens)
    raise ValueError(f"unknown loss reduction {mode!r}; allowed: {', '.join(ReductionMode.__args__)}")


def _counts(mask_BT: Tensor) -> Tensor:
    """|o_i|: the number of masked tokens per row, [batch], in float."""
    return (mask_BT != 0).sum(-1).float()


def _check_positive(**normalisers: float) -> None:
    for name, value in normalisers.items():
        if not value > 0:
            raise ValueError(f"reduce_loss: {name} must be > 0, got {value}")
