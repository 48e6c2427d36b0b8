"""Offline preference losses: DPO and its variants, and ORPO. Pure functions of tensors returning `(loss, metrics)`.

Notation (docs/algorithms.md#dpo): `S(y) = sum_t lp_t` over completion tokens (see
`sequence_logprob`), `d_c = S_pi(y_c) - S_ref(y_c)`, `d_r = S_pi(y_r) - S_ref(y_r)`, `z = d_c - d_r`. Every DPO
variant takes the four sequence log-probs `[batch]` and returns the batch mean of its per-pair loss together with
the same metrics: `rewards/chosen` = mean(beta d_c), `rewards/rejected` = mean(beta d_r),
`rewards/accuracy` = mean(d_c > d_r) (a tie counts as wrong), `rewards/margin` = mean(beta (d_c - d_r)).
Reference log-probs carry no gradient; compute them under `no_grad` (or precompute them once).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.algorithms.masked import masked_mean, masked_sum


def sequence_logprob(logprobs_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """`S(y) = sum_t lp_t` over the masked (completion) tokens, shape [batch]; masked-out NaN/inf do not leak."""
    if logprobs_BT.dim() != 2:
        raise ValueError(f"sequence_logprob: expected [batch, tokens], got {tuple(logprobs_BT.shape)}")
    return masked_sum(logprobs_BT, mask_BT, dim=-1)


def dpo_sigmoid(
    pi_chosen_B: Tensor, pi_rejected_B: Tensor, ref_chosen_B: Tensor, ref_rejected_B: Tensor, beta: float = 0.1
) -> tuple[Tensor, dict[str, float]]:
    """DPO: `-log sigmoid(beta z)`, mean over the batch (Rafailov et al., 2305.18290, eq. 7).

    Worked value: beta=0.1, z=1.5 -> softplus(-0.15) = 0.620957; at step 0 (policy == reference) ln 2.
    Deviations: none (the expectation of eq. 7 is the batch mean).
    """
    d_c_B, d_r_B = _log_ratios(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, beta, "dpo_sigmoid")
    loss_B = -F.logsigmoid(beta * (d_c_B - d_r_B))
    return loss_B.mean(), _dpo_metrics(d_c_B, d_r_B, beta)


def dpo_hinge(
    pi_chosen_B: Tensor, pi_rejected_B: Tensor, ref_chosen_B: Tensor, ref_rejected_B: Tensor, beta: float = 0.1
) -> tuple[Tensor, dict[str, float]]:
    """Hinge DPO: `relu(1 - beta z)`, mean over the batch: SLiC-HF's calibration hinge (Zhao et al., 2305.10425,
    eq. 2) on DPO's reference-normalised log-ratios, as TRL's `loss_type="hinge"`. Worked value -> 0.85.

    Deviation: SLiC uses the policy log-probs alone (no reference) and a margin delta; here the margin is 1/beta
    in units of z (`1 - beta z = beta (1/beta - z)`), the reference-normalised form.
    """
    d_c_B, d_r_B = _log_ratios(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, beta, "dpo_hinge")
    loss_B = torch.relu(1 - beta * (d_c_B - d_r_B))
    return loss_B.mean(), _dpo_metrics(d_c_B, d_r_B, beta)


def dpo_robust(
    pi_chosen_B: Tensor,
    pi_rejected_B: Tensor,
    ref_chosen_B: Tensor,
    ref_rejected_B: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Robust DPO for labels flipped with probability eps = `label_smoothing` (Chowdhury et al., 2403.00409, eq. 8):
    `[-(1 - eps) log sigmoid(beta z) + eps log sigmoid(-beta z)] / (1 - 2 eps)`, mean over the batch.

    An unbiased estimate of the clean-label DPO loss; eps=0 is `dpo_sigmoid`. Worked value eps=0.1, beta=0.1,
    z=1.5 -> (0.9 * 0.620957 - 0.1 * 0.770957) / 0.8 = 0.602207. Needs 0 <= eps < 0.5.
    Deviations: none. (Not cDPO's conservative loss, which *adds* the two terms without the 1/(1-2eps).)
    """
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    d_c_B, d_r_B = _log_ratios(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, beta, "dpo_robust")
    logits_B = beta * (d_c_B - d_r_B)
    eps = label_smoothing
    loss_B = (-(1 - eps) * F.logsigmoid(logits_B) + eps * F.logsigmoid(-logits_B)) / (1 - 2 * eps)
    return loss_B.mean(), _dpo_metrics(d_c_B, d_r_B, beta)


def dpo_ipo(
    pi_chosen_B: Tensor,
    pi_rejected_B: Tensor,
    ref_chosen_B: Tensor,
    ref_rejected_B: Tensor,
    beta: float,
    chosen_lengths_B: Tensor,
    rejected_lengths_B: Tensor,
) -> tuple[Tensor, dict[str, float]]:
    """IPO: `((d_c/|y_c| - d_r/|y_r|) - 1/(2 beta))^2`, mean over the batch (Azar et al., 2310.12036, eq. 17,
    with beta as the paper's tau).

    Args:
        chosen_lengths_B, rejected_lengths_B: |y| in completion tokens, [batch]; must be > 0.

    Deviation: the paper's h is the *sum* log-ratio; dividing by the length (the per-token mean) is TRL's
    choice, which docs/algorithms.md#dpo adopts. The metrics use the unnormalised d_c, d_r like the other variants.
    """
    if beta <= 0:
        raise ValueError(f"dpo_ipo: beta must be > 0, got {beta}")
    if bool((chosen_lengths_B <= 0).any()) or bool((rejected_lengths_B <= 0).any()):
        raise ValueError("dpo_ipo: every completion length must be > 0")
    d_c_B, d_r_B = _log_ratios(pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B, beta, "dpo_ipo")
    h_B = d_c_B / chosen_lengths_B - d_r_B / rejected_lengths_B
    loss_B = (h_B - 1 / (2 * beta)).square()
    return loss_B.mean(), _dpo_metrics(d_c_B, d_r_B, beta)


def orpo(
    chosen_logprobs_BT: Tensor,
    chosen_mask_BT: Tensor,
    rejected_logprobs_BT: Tensor,
    rejected_mask_BT: Tensor,
    lam: float = 0.1,
) -> tuple[Tensor, dict[str, float]]:
    """ORPO: `L = NLL(y_c) - lam * log sigmoid(log_odds(y_c) - log_odds(y_r))`, mean over the batch (Hong et al.,
    2403.07691, eqs. 6-8). No reference model.

    `a(y)` is the MEAN token log-prob of the completion (over its mask), `NLL(y_c) = -a(y_c)`, and
    `log_odds(y) = a(y) - log(1 - exp(a(y)))` with `log1mexp` computed stably.

    Args:
        chosen_logprobs_BT, rejected_logprobs_BT: per-token log-probs of the sampled tokens (with gradient);
            the two may have different lengths T.
        chosen_mask_BT, rejected_mask_BT: 1 on completion tokens; every row needs at least one.
        lam: weight of the odds-ratio term (the paper's lambda, default 0.1).

    Metrics: `nll`, `log_odds_ratio` (mean of log_odds_c - log_odds_r), `log_odds_chosen`, `log_odds_rejected`,
    `accuracy` (mean of log_odds_c > log_odds_r).

    Deviations: the NLL is a per-sequence token mean, then a batch mean (the paper's L_SFT; TRL instead takes one
    token mean over all chosen tokens of the batch). `a` is clamped to at most -finfo(dtype).tiny (the smallest
    normal number), so a completion of probability exactly 1 gives a large finite log-odds instead of inf/NaN.
    """
    a_c_B = _mean_logprob(chosen_logprobs_BT, chosen_mask_BT)
    a_r_B = _mean_logprob(rejected_logprobs_BT, rejected_mask_BT)
    log_odds_c_B = _log_odds(a_c_B)
    log_odds_r_B = _log_odds(a_r_B)
    ratio_B = log_odds_c_B - log_odds_r_B
    nll_B = -a_c_B
    loss_B = nll_B - lam * F.logsigmoid(ratio_B)
    metrics = {
        "nll": float(nll_B.detach().mean()),
        "log_odds_ratio": float(ratio_B.detach().mean()),
        "log_odds_chosen": float(log_odds_c_B.detach().mean()),
        "log_odds_rejected": float(log_odds_r_B.detach().mean()),
        "accuracy": float((ratio_B.detach() > 0).float().mean()),
    }
    return loss_B.mean(), metrics


def log1mexp(a: Tensor) -> Tensor:
    """`log(1 - exp(a))` for a <= 0, stable at both ends (Maechler, "Accurately computing log(1 - exp(-|a|))").

    For a > -ln 2, `log(-expm1(a))` (1 - exp(a) is tiny and expm1 keeps its digits); otherwise `log1p(-exp(a))`.
    Each branch sees only inputs from its own range, so the unused branch cannot put inf/NaN into the gradient.
    """
    cut = -math.log(2.0)
    near_zero = a > cut
    near_branch = torch.log(-torch.expm1(a.clamp(min=cut)))
    far_branch = torch.log1p(-torch.exp(a.clamp(max=cut)))
    return torch.where(near_zero, near_branch, far_branch)


# --------------------------------------------------------------------------------------------------- helpers


def _log_ratios(
    pi_chosen_B: Tensor, pi_rejected_B: Tensor, ref_chosen_B: Tensor, ref_rejected_B: Tensor, beta: float, who: str
) -> tuple[Tensor, Tensor]:
    """(d_c, d_r), each [batch], after checking that the four inputs are [batch] vectors of one shape."""
    shapes = {tuple(t.shape) for t in (pi_chosen_B, pi_rejected_B, ref_chosen_B, ref_rejected_B)}
    if len(shapes) != 1 or pi_chosen_B.dim() != 1:
        raise ValueError(f"{who}: the four sequence log-probs must be [batch] of one shape, got {sorted(shapes)}")
    if beta <= 0:
        raise ValueError(f"{who}: beta must be > 0, got {beta}")
    return pi_chosen_B - ref_chosen_B, pi_rejected_B - ref_rejected_B


def _dpo_metrics(d_c_B: Tensor, d_r_B: Tensor, beta: float) -> dict[str, float]:
    d_c_B, d_r_B = d_c_B.detach(), d_r_B.detach()
    return {
        "rewards/chosen": float((beta * d_c_B).mean()),
        "rewards/rejected": float((beta * d_r_B).mean()),
        "rewards/accuracy": float((d_c_B > d_r_B).float().mean()),
        "rewards/margin": float((beta * (d_c_B - d_r_B)).mean()),
    }


def _mean_logprob(logprobs_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """a(y): the mean log-prob over the masked tokens of each row, [batch]."""
    if logprobs_BT.dim() != 2:
        raise ValueError(f"orpo: expected [batch, tokens] log-probs, got {tuple(logprobs_BT.shape)}")
    if bool(((mask_BT != 0).sum(-1) == 0).any()):
        raise ValueError("orpo: every completion needs at least one masked token")
    return masked_mean(logprobs_BT, mask_BT, dim=-1)


def _log_odds(a_B: Tensor) -> Tensor:
    """log(p / (1 - p)) with log p = a; a clamped just below 0 (see `orpo`'s deviations)."""
    a_B = a_B.clamp(max=-torch.finfo(a_B.dtype).tiny)
    return a_B - log1mexp(a_B)
