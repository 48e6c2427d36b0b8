"""Truncated importance sampling (TIS) for rollouts whose log-probs come from another policy or engine.

The samples are drawn by the inference engine (`lp_sampler`), possibly with weights one step older than the learner's
(async mode), while the policy-gradient loss is written for samples from the learner's policy before the update
(`lp_old`). Each token's policy term is weighted by `w = min(exp(lp_old - lp_sampler), C)` (docs/algorithms.md#tis; Yao
et al., "Your efficient RL framework secretly brings you off-policy RL training", 2025, the TIS fix): an importance
weight from sampler to learner, truncated at C so a token the sampler found unlikely cannot dominate the step.
The weight carries no gradient: it multiplies the per-token loss like a constant.
"""

from __future__ import annotations

import torch
from torch import Tensor


def tis_weights(
    old_logprobs_BT: Tensor, sampler_logprobs_BT: Tensor, mask_BT: Tensor, cap: float
) -> tuple[Tensor, dict[str, float]]:
    """Per-token truncated importance weights `min(exp(lp_old - lp_sampler), cap)`, 0 where the mask is 0.

    Args:
        old_logprobs_BT: [batch, tokens] log-probs of the sampled tokens under the learner's pre-update policy.
        sampler_logprobs_BT: [batch, tokens] the same as the rollout engine reported them when sampling.
        mask_BT: [batch, tokens], bool or 0/1; nonzero on tokens that carry loss.
        cap: C > 0, the truncation.
    Returns:
        (weights [batch, tokens], detached, no gradient; metrics over masked tokens as floats: `tis/weight_mean`,
        `tis/truncated_fraction` (tokens whose raw weight exceeded C), `tis/log_ratio_abs_mean`).
    """
    if not cap > 0:
        raise ValueError(f"tis_weights: cap must be > 0, got {cap}")
    if old_logprobs_BT.shape != sampler_logprobs_BT.shape or mask_BT.shape != old_logprobs_BT.shape:
        raise ValueError(
            f"tis_weights: old {tuple(old_logprobs_BT.shape)}, sampler {tuple(sampler_logprobs_BT.shape)} and mask "
            f"{tuple(mask_BT.shape)} must have the same [batch, tokens] shape"
        )
    mask = mask_BT.bool()
    with torch.no_grad():
        # zero the log-ratio on padding before exp: padding may hold anything (inf - inf = NaN)
        log_ratio_BT = torch.where(mask, old_logprobs_BT.detach() - sampler_logprobs_BT.detach(), 0.0)
        raw_BT = torch.exp(log_ratio_BT)
        weights_BT = torch.where(mask, torch.clamp(raw_BT, max=cap), 0.0)
        count = max(int(mask.sum()), 1)
        metrics = {
            "tis/weight_mean": float(weights_BT.sum()) / count,
            "tis/truncated_fraction": float(((raw_BT > cap) & mask).sum()) / count,
            "tis/log_ratio_abs_mean": float(log_ratio_BT.abs().sum()) / count,
        }
    return weights_BT, metrics
