"""Policy-gradient losses, per token (reduce them with `algorithms.reduction.reduce_loss`).

Two named variants share one clipped surrogate: `clipped_policy_loss` (PPO/GRPO, one ratio per token) and
`gspo_policy_loss` (GSPO, one ratio per sequence, broadcast over its tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_mean


def clipped_policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_B_or_BT: Tensor,
    mask_BT: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped surrogate per token: `L = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)`.

    PPO (Schulman et al., 1707.06347), eq. 7, with `ratio = exp(lp - lp_old)`. `eps_high > eps_low` is DAPO's
    clip-higher (2503.14476, section 3.1). With `dual_clip = c > 1`, a token with A < 0 has its loss capped at
    `c * |A|`, so a huge ratio on a bad token cannot blow the update up (Ye et al., 1912.09729, "dual-clip PPO").

    Args:
        logprobs_BT: [batch, tokens] log-probs of the sampled tokens under the current policy (with gradient).
        old_logprobs_BT: [batch, tokens] the same under the policy that generated the samples (no gradient).
        advantages_B_or_BT: [batch] (one per sequence, broadcast over its tokens) or [batch, tokens].
        mask_BT: [batch, tokens], bool or 0/1; nonzero on completion tokens that carry loss.
        eps_low, eps_high: the clip range [1 - eps_low, 1 + eps_high] of the ratio.
        dual_clip: the cap c (> 1) for tokens with A < 0; `None` turns it off.

    Returns:
        `L_BT`, the per-token loss [batch, tokens], exactly 0 (with 0 gradient) where the mask is 0, even if the
        inputs there are NaN/inf; and metrics over masked tokens, as python floats: `clip_fraction` (the min picked
        the clipped term and it was strictly smaller), `ratio/mean`, `ratio/min`, `ratio/max` (NaN if no token
        is masked), and `dual_clip_fraction` when `dual_clip` is set.

    Deviations, stated: the loss is not reduced here (PPO takes an expectation over tokens; how is
    `reduce_loss`'s decision). Advantages are not normalised here.
    """
    mask = mask_BT.bool()
    advantages_BT = _broadcast_advantages(advantages_B_or_BT, logprobs_BT, old_logprobs_BT, mask)
    # Zero the inputs at masked positions *before* exp: `where` sends a zero gradient to the branch it drops, but
    # an inf/NaN computed from that branch would still turn it into NaN (0 * inf) on the way back.
    log_ratio_BT = torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0)
    return _clipped_surrogate(log_ratio_BT, advantages_BT, mask, eps_low, eps_high, dual_clip)


def gspo_policy_loss(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_B_or_BT: Tensor,
    mask_BT: Tensor,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
    dual_clip: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GSPO's clipped surrogate with one importance ratio per sequence, written per token.

    Zheng et al., Group Sequence Policy Optimization (2507.18071), eq. 5-7: `s_i = exp(mean_t (lp - lp_old))` over
    the sequence's masked tokens, then `L = -min(s_i A, clip(s_i, 1 - eps_low, 1 + eps_high) A)`. Every token of
    sequence i carries that same loss value, and `s_i` keeps its gradient (`d s_i / d lp_t = s_i / |o_i|`), so
    with `seq-mean-token-mean` the reduced loss is exactly the paper's sequence-level objective; with other
    reductions sequences are weighted as the reduction says. Arguments and returned metrics are those of
    `clipped_policy_loss` (the ratio metrics then describe sequence ratios, counted once per token).

    Defaults: the paper's clip range, 3e-4 / 4e-4 (sequence ratios sit much closer to 1 than token ratios).
    Deviations, stated: token-level advantages ([B, T]) are accepted and used per token, whereas the paper has one
    advantage per sequence; dual clip is an option the paper does not discuss.
    """
    mask = mask_BT.bool()
    advantages_BT = _broadcast_advantages(advantages_B_or_BT, logprobs_BT, old_logprobs_BT, mask)
    log_ratio_BT = torch.where(mask, logprobs_BT - old_logprobs_BT, 0.0)
    return _clipped_surrogate(sequence_log_ratio(log_ratio_BT, mask), advantages_BT, mask, eps_low, eps_high, dual_clip)


def sequence_log_ratio(log_ratio_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio `mean_t (lp - lp_old)` over masked tokens, broadcast to [B, T].

    Gradients flow to every masked token of the row (1/|o_i| each); a row with no masked token gets 0.
    """
    seq_B = masked_mean(log_ratio_BT, mask_BT, dim=-1)
    return seq_B[:, None].expand_as(log_ratio_BT)  # [B] -> [B, 1] -> [B, T]: one ratio per sequence


def _clipped_surrogate(
    log_ratio_BT: Tensor, advantages_BT: Tensor, mask: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, dict[str, float]]:
    """The clipped (and optionally dual-clipped) surrogate of `clipped_policy_loss` from a log-ratio [B, T]."""
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"clipped_policy_loss: need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"clipped_policy_loss: dual_clip must be > 1, got {dual_clip}")
    log_ratio_BT = torch.where(mask, log_ratio_BT, 0.0)
    advantages_BT = torch.where(mask, advantages_BT, 0.0)
    ratio_BT = torch.exp(log_ratio_BT)
    unclipped_BT = ratio_BT * advantages_BT
    clipped_BT = torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high) * advantages_BT
    loss_BT = -torch.minimum(unclipped_BT, clipped_BT)
    metrics = {}
    if dual_clip is not None:
        cap_BT = -dual_clip * advantages_BT  # = c * |A| where A < 0
        capped = (advantages_BT < 0) & (loss_BT > cap_BT) & mask
        loss_BT = torch.where(capped, cap_BT, loss_BT)
        metrics["dual_clip_fraction"] = _fraction(capped, mask)
    loss_BT = torch.where(mask, loss_BT, 0.0)
    metrics["clip_fraction"] = _fraction((clipped_BT < unclipped_BT) & mask, mask)
    metrics.update(_ratio_stats(ratio_BT.detach(), mask))
    return loss_BT, metrics


def _broadcast_advantages(advantages: Tensor, logprobs_BT: Tensor, old_logprobs_BT: Tensor, mask: Tensor) -> Tensor:
    """Advantages as [batch, tokens]; checks that every input has the shape of `logprobs_BT`."""
    shape = logprobs_BT.shape
    if logprobs_BT.dim() != 2 or old_logprobs_BT.shape != shape or mask.shape != shape:
        raise ValueError(
            f"clipped_policy_loss: logprobs {tuple(shape)}, old_logprobs {tuple(old_logprobs_BT.shape)} and mask "
            f"{tuple(mask.shape)} must all be the same [batch, tokens] shape"
        )
    if advantages.shape == shape[:1]:
        return advantages[:, None].expand(shape)  # [B] -> [B, 1] -> [B, T]: one advantage per sequence
    if advantages.shape == shape:
        return advantages
    raise ValueError(f"clipped_policy_loss: advantages {tuple(advantages.shape)} fit neither [B] nor [B, T] {shape}")


@torch.no_grad()
def _fraction(selected_BT: Tensor, mask_BT: Tensor) -> float:
    return float(selected_BT.sum()) / max(int(mask_BT.sum()), 1)


@torch.no_grad()
def _ratio_stats(ratio_BT: Tensor, mask_BT: Tensor) -> dict[str, float]:
    ratios = ratio_BT[mask_BT]
    if ratios.numel() == 0:
        return {"ratio/mean": float("nan"), "ratio/min": float("nan"), "ratio/max": float("nan")}
    return {"ratio/mean": float(ratios.mean()), "ratio/min": float(ratios.min()), "ratio/max": float(ratios.max())}
