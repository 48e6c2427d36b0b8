"""Online rejection-sampling fine-tuning (RFT): which sampled completions are kept for the SFT step.

Llama 2 (2307.09288, section 3.2.3) keeps the best of K samples per prompt by reward; RAFT (2304.06767) the
top-ranked ones; ReST-EM / "verified" variants keep every sample that passes a checker. Here: per prompt, keep the
best one, or all of them, among the samples whose reward reaches `min_reward`. The kept completions are then
trained on with the SFT loss (`algorithms.losses.sft_nll`). A pure function of the rewards.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def rft_keep_mask(rewards_BG: Tensor, keep: Literal["best", "all"], min_reward: float | None) -> Tensor:
    """[num_prompts, group] bool: the completions RFT trains on.

    Args:
        rewards_BG: [num_prompts, group] rewards; NaN marks a skipped sample (never kept).
        keep: `"best"` keeps one sample per prompt, the highest reward (the first one on ties);
            `"all"` keeps every sample that clears `min_reward`.
        min_reward: the threshold a kept sample must reach (`reward >= min_reward`, e.g. 1.0 = verified correct);
            `None` keeps the best whatever its reward (only with `keep="best"`).

    Worked value: rewards [[0, 1, 1], [0.5, 0, 0.2]], min_reward 0.5 -> best: [[F, T, F], [T, F, F]];
    all: [[F, T, T], [T, F, F]]; min_reward 1.0, best: [[F, T, F], [F, F, F]].
    """
    if rewards_BG.dim() != 2 or not rewards_BG.is_floating_point():
        raise ValueError(f"rft_keep_mask: rewards must be a float [num_prompts, group], got {tuple(rewards_BG.shape)}")
    if keep not in ("best", "all"):
        raise ValueError(f"rft_keep_mask: keep must be 'best' or 'all', got {keep!r}")
    if keep == "all" and min_reward is None:
        raise ValueError("rft_keep_mask: keep='all' needs a min_reward (otherwise every sample is kept)")
    valid_BG = ~torch.isnan(rewards_BG)
    passing_BG = valid_BG if min_reward is None else valid_BG & (rewards_BG >= min_reward)
    if keep == "all":
        return passing_BG
    ranked_BG = torch.where(valid_BG, rewards_BG, -torch.inf)
    best_B = ranked_BG.argmax(-1)  # the first maximum on ties
    best_BG = torch.zeros_like(valid_BG).scatter_(-1, best_B[:, None], True)
    return best_BG & passing_BG
