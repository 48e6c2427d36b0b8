"""Supervised fine-tuning loss: token-mean NLL over the supervised tokens."""

from __future__ import annotations

from torch import Tensor

from posttrain.algorithms.masked import masked_mean
from posttrain.algorithms.reduction import token_mean


def sft_nll(logprobs_BT: Tensor, mask_BT: Tensor, num_tokens: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood `sum(-lp * m) / num_tokens` (docs/algorithms.md#sft).

    Args:
        logprobs_BT: [batch, tokens] log-probs of the target tokens (with gradient).
        mask_BT: [batch, tokens], nonzero on supervised tokens only (completion / assistant turns).
        num_tokens: the number of supervised tokens in the *whole optimizer step* (all micro-batches, all ranks),
            as in `algorithms.reduction.token_mean`; then the micro-batch losses add up to the full-batch value. `None`
            uses this call's own count, right only when the call sees the whole step.

    Metrics: `nll` (this call's own token mean, independent of `num_tokens`) and `num_tokens` (this call's count).
    Deviations: none; packing is the data pipeline's business (pass the packed mask).
    """
    if logprobs_BT.dim() != 2 or logprobs_BT.shape != mask_BT.shape:
        raise ValueError(
            f"sft_nll: expected [batch, tokens] log-probs and mask of one shape, got {tuple(logprobs_BT.shape)} "
            f"and {tuple(mask_BT.shape)}"
        )
    nll_BT = -logprobs_BT
    loss = token_mean(nll_BT, mask_BT, num_tokens)
    metrics = {
        "nll": float(masked_mean(nll_BT.detach(), mask_BT)),
        "num_tokens": float((mask_BT != 0).sum()),
    }
    return loss, metrics
