"""Reward-model training loss (Bradley-Terry on pairwise preferences)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(
    chosen_scores_B: Tensor,
    rejected_scores_B: Tensor,
    margin_B: Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """Pairwise Bradley-Terry loss `mean(-log sigmoid(r_c - r_r - margin) + c (r_c + r_r)^2)`.

    Bradley & Terry (1952) as used for RLHF reward models by InstructGPT (Ouyang et al., 2203.02155, eq. 1). The
    margin is Llama 2's (2307.09288, eq. 2: a larger required gap for more clearly preferred pairs); the centering
    term `c (r_c + r_r)^2` keeps the scores near zero mean (Eisenstein et al., 2312.09244, as TRL's
    `center_rewards_coefficient`).

    Args:
        chosen_scores_B, rejected_scores_B: scalar scores [batch] from the reward head (with gradient).
        margin_B: optional [batch] margins; `None` is 0.
        center_coef: c >= 0.

    Metrics: `accuracy` = mean(r_c > r_r) (a tie is wrong), `margin` = mean(r_c - r_r), and `chosen`/`rejected`
    score means.
    Deviations: none; InstructGPT's 1/C(K,2) weighting over the K-way comparisons is the caller's batching.
    """
    if chosen_scores_B.dim() != 1 or chosen_scores_B.shape != rejected_scores_B.shape:
        raise ValueError(
            f"bradley_terry: scores must be [batch] of one shape, got {tuple(chosen_scores_B.shape)} and "
            f"{tuple(rejected_scores_B.shape)}"
        )
    if margin_B is not None and margin_B.shape != chosen_scores_B.shape:
        raise ValueError(f"bradley_terry: margin {tuple(margin_B.shape)} must be [batch] like the scores")
    if center_coef < 0:
        raise ValueError(f"bradley_terry: center_coef must be >= 0, got {center_coef}")
    gap_B = chosen_scores_B - rejected_scores_B
    logits_B = gap_B if margin_B is None else gap_B - margin_B
    loss_B = -F.logsigmoid(logits_B) + center_coef * (chosen_scores_B + rejected_scores_B).square()
    gap_B = gap_B.detach()
    metrics = {
        "accuracy": float((gap_B > 0).float().mean()),
        "margin": float(gap_B.mean()),
        "chosen": float(chosen_scores_B.detach().mean()),
        "rejected": float(rejected_scores_B.detach().mean()),
    }
    return loss_B.mean(), metrics
