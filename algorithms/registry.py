"""Which advantage each online algorithm trains on: a pure dispatch from rewards (and KL) to advantages.

The estimators themselves live in `algorithms/advantages.py` (GRPO, RLOO) and `algorithms/gae.py` (REINFORCE++); this
module only decides, per `algorithm.name`, which one runs and where the KL to the reference goes. Online RFT has no
advantage (it keeps samples, `algorithms/rft.py`), and PPO is not here (it needs a critic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.algorithms.advantages import group_relative_advantages, rloo_advantages
from posttrain.algorithms.kl import kl_penalized_rewards
from posttrain.algorithms.reinforce_pp import reinforce_pp_advantages

SEQUENCE_ADVANTAGES = ("grpo", "rloo")
"""one advantage per completion, broadcast over its tokens"""
TOKEN_ADVANTAGES = ("reinforce_pp", "reinforce_pp_baseline")
"""one advantage per token (the KL-to-go differs along the completion)"""


@dataclass
class Advantages:
    """Exactly one of the two is set."""

    sequence_B: Tensor | None = None
    """[B] per completion; 0 for skipped samples"""
    token_BC: Tensor | None = None
    """[B, C] per completion token; 0 on padding and on skipped samples"""


def online_advantages(
    name: str,
    rewards_BG: Tensor,
    mask_BC: Tensor,
    kl_BC: Tensor | None = None,
    kl_coef: float = 0.0,
    advantage_std: str = "group",
) -> Advantages:
    """Advantages of `name` for B = num_prompts * G completions (rows of `mask_BC` are the groups, in order).

    Args:
        name: `grpo`, `rloo`, `reinforce_pp` or `reinforce_pp_baseline`.
        rewards_BG: [num_prompts, G] sequence rewards; NaN = skipped sample (its row of `mask_BC` must be 0).
        mask_BC: [B, C] completion-token mask.
        kl_BC: [B, C] per-token KL estimate (no gradient) when the KL goes in the reward; `None` otherwise.
        kl_coef: weight of that KL in the reward.
        advantage_std: GRPO's denominator (`group`, `batch`, `none`).

    KL in the reward: GRPO and RLOO subtract `kl_coef * sum_t KL_t` from each sequence reward before their
    baseline (`kl_penalized_rewards`); REINFORCE++ subtracts the KL still to come at every token (its paper's
    return). The `_baseline` variant first centres rewards on their group mean (skipped samples left out), which
    equals `reinforce_pp_advantages(group_size=G)` when nothing is skipped.
    """
    num_prompts, group = rewards_BG.shape
    if mask_BC.shape[0] != num_prompts * group:
        raise ValueError(f"online_advantages: mask has {mask_BC.shape[0]} rows for {num_prompts} x {group} rewards")
    if kl_BC is not None and kl_BC.shape != mask_BC.shape:
        raise ValueError(f"online_advantages: KL {tuple(kl_BC.shape)} must be shaped like the mask")
    if name in SEQUENCE_ADVANTAGES:
        if kl_BC is not None:
            rewards_B = kl_penalized_rewards(rewards_BG.reshape(-1), kl_BC, mask_BC, kl_coef)
            rewards_BG = rewards_B.view(num_prompts, group)  # [B] -> [num_prompts, G]
        if name == "grpo":
            advantages_BG = group_relative_advantages(rewards_BG, std=advantage_std)
        else:
            advantages_BG = rloo_advantages(rewards_BG)
        return Advantages(sequence_B=advantages_BG.reshape(-1))
    if name in TOKEN_ADVANTAGES:
        if name == "reinforce_pp_baseline":
            rewards_BG = group_relative_advantages(rewards_BG, std="none")  # r - mean_group(r); skipped -> 0
        rewards_B = torch.nan_to_num(rewards_BG.reshape(-1), nan=0.0)  # skipped rows are masked out anyway
        kl = torch.zeros_like(mask_BC, dtype=rewards_B.dtype) if kl_BC is None else kl_BC
        token_BC = reinforce_pp_advantages(rewards_B, kl, mask_BC, kl_coef if kl_BC is not None else 0.0)
        return Advantages(token_BC=token_BC)
    raise ValueError(
        f"online_advantages: unknown algorithm {name!r}; allowed: {SEQUENCE_ADVANTAGES + TOKEN_ADVANTAGES}"
    )
