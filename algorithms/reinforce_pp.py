"""REINFORCE++ (Hu, 2501.03262): critic-free token advantages, the sequence reward minus the KL still to come,
whitened over the batch. Pure tensor math, like the rest of `algorithms/`."""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.gae import whiten
from posttrain.algorithms.masked import check_bt


def reinforce_pp_advantages(
    rewards_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float, group_size: int | None = None
) -> Tensor:
    """REINFORCE++ token advantages (Hu, 2501.03262, sections 3.1-3.2), [batch, tokens].

    Per-token return (gamma = 1): `return_t = r_seq - kl_coef * sum_{s >= t, masked} KL_s`, i.e. the sequence
    reward minus the KL penalty still to come; then whitened over all masked tokens of the batch (`whiten`).
    With `group_size = G` (the "REINFORCE++-baseline" variant), rows are consecutive groups of G samples of one
    prompt and `r_seq` is first replaced by `r_seq - mean_group(r_seq)`.

    Args:
        rewards_B: [batch] sequence rewards (batch = num_prompts * G when grouped).
        kl_BT: [batch, tokens] per-token KL estimate (e.g. `algorithms.kl.kl_k1`), no gradient.
        mask_BT: [batch, tokens] completion mask.
        kl_coef: the KL penalty coefficient (>= 0).
        group_size: G for the baseline variant; `None` for plain REINFORCE++.

    Deviations: NaN (skipped) rewards are not handled here (mask those rows out and give them a 0 reward).
    """
    check_bt(mask_BT, "reinforce_pp_advantages", kl_BT)
    if rewards_B.shape != mask_BT.shape[:1]:
        raise ValueError(f"reinforce_pp_advantages: rewards {tuple(rewards_B.shape)} must be [batch]")
    if group_size is not None:
        if group_size < 1 or rewards_B.shape[0] % group_size:
            raise ValueError(f"reinforce_pp_advantages: batch {rewards_B.shape[0]} is not a multiple of {group_size}")
        rewards_BG = rewards_B.reshape(-1, group_size)  # consecutive rows are one prompt's group
        rewards_B = (rewards_BG - rewards_BG.mean(-1, keepdim=True)).reshape(-1)
    mask = mask_BT.bool()
    penalty_BT = torch.where(mask, kl_coef * kl_BT, 0.0)
    penalty_to_go_BT = penalty_BT.flip(-1).cumsum(-1).flip(-1)  # sum_{s >= t}
    returns_BT = torch.where(mask, rewards_B[:, None] - penalty_to_go_BT, 0.0)
    return whiten(returns_BT, mask_BT)
