"""Advantage estimators: pure functions of the rewards of a batch shaped [num_prompts, group].

Skipped samples: a NaN reward means "this sample was skipped" (a reward function failed and the config said
skip). NaNs are left out of every mean and std, and the skipped sample gets advantage 0 (never NaN), so it
carries no gradient even if a caller forgets to mask it. A group with fewer than two valid samples has no
baseline to compare against, and its valid sample gets advantage 0 too.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def group_relative_advantages(
    rewards_BG: Tensor, std: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> Tensor:
    """GRPO's group-relative advantage `A = (r - mean_group(r)) / (std(r) + eps)`, shape [num_prompts, group].

    DeepSeekMath (2402.03300), section 4.1.2 (outcome supervision). Options for the denominator:
      - `"group"`: unbiased std of the group's rewards (the paper);
      - `"batch"`: unbiased std of all rewards in the batch, the group mean still subtracted (as TRL's
        `scale_rewards="batch"`; "group mean, batch std" in Liu et al., "Tricks or Traps?", 2025);
      - `"none"`: no division, mean-centred only (Dr. GRPO, 2503.20783).

    Args:
        rewards_BG: [num_prompts, group] scalar rewards; NaN marks a skipped sample (see the module docstring).
        std: which std divides the centred rewards.
        eps: added to the std, so a zero-variance group gives 0 rather than 0/0.

    Deviations, stated: the std is the unbiased one (`torch.std`'s default; the paper does not say); NaN rewards
    are ignored in the mean/std and their advantage is 0; a group with one valid sample gets 0.

    Worked value: [1, 0, 0] -> mean 1/3, std sqrt(1/3) = 0.57735 -> [1.15450, -0.57725, -0.57725].
    """
    _check_rewards(rewards_BG, "group_relative_advantages")
    valid_BG = ~torch.isnan(rewards_BG)
    count_B1 = valid_BG.sum(-1, keepdim=True)
    centred_BG = rewards_BG - _nanmean(rewards_BG, valid_BG, count_B1)
    if std == "none":
        advantages_BG = centred_BG
    elif std == "group":
        advantages_BG = centred_BG / (_unbiased_std(centred_BG, valid_BG, count_B1) + eps)
    elif std == "batch":
        flat_1N = rewards_BG.reshape(1, -1)  # the whole batch as one group
        flat_valid_1N = valid_BG.reshape(1, -1)
        flat_count_11 = flat_valid_1N.sum(-1, keepdim=True)
        flat_centred_1N = flat_1N - _nanmean(flat_1N, flat_valid_1N, flat_count_11)
        advantages_BG = centred_BG / (_unbiased_std(flat_centred_1N, flat_valid_1N, flat_count_11) + eps)
    else:
        raise ValueError(f"unknown advantage std {std!r}; allowed: group, batch, none")
    return _zero_where_no_signal(advantages_BG, valid_BG, count_B1)


def rloo_advantages(rewards_BG: Tensor) -> Tensor:
    """REINFORCE leave-one-out: `A_i = r_i - (sum_j r_j - r_i) / (G - 1)`, shape [num_prompts, group].

    Ahmadian et al. (2402.14740), with the baseline of Kool et al. (2019). Each sample's baseline is the mean of
    the *other* samples of its prompt, so it is independent of the sample itself (an unbiased estimator).

    Deviation, stated: NaN (skipped) rewards are left out and G becomes the number of valid samples in the group;
    skipped samples and groups with fewer than two valid samples get 0.

    Worked value: [1, 0, 0.5] -> [1 - 0.25, 0 - 0.75, 0.5 - 0.5] = [0.75, -0.75, 0].
    """
    _check_rewards(rewards_BG, "rloo_advantages")
    valid_BG = ~torch.isnan(rewards_BG)
    count_B1 = valid_BG.sum(-1, keepdim=True)
    zeroed_BG = torch.where(valid_BG, rewards_BG, 0.0)
    others_mean_BG = (zeroed_BG.sum(-1, keepdim=True) - zeroed_BG) / (count_B1 - 1).clamp(min=1)
    return _zero_where_no_signal(rewards_BG - others_mean_BG, valid_BG, count_B1)


def zero_variance_group_fraction(rewards_BG: Tensor) -> float:
    """Fraction of groups whose valid rewards are all equal (so every advantage in them is 0).

    DAPO (2503.14476) filters these groups out ("dynamic sampling"); whether or not they are filtered, the fraction
    is worth logging. NaN (skipped) rewards are ignored; a group with fewer than two valid rewards counts as
    zero-variance, since it carries no signal either. An empty batch gives 0.0.
    """
    _check_rewards(rewards_BG, "zero_variance_group_fraction")
    if rewards_BG.shape[0] == 0:
        return 0.0
    return float((~informative_groups(rewards_BG)).float().mean())


def informative_groups(rewards_BG: Tensor) -> Tensor:
    """[num_prompts] bool: True for groups with at least two valid rewards that differ (they carry signal).

    DAPO's dynamic sampling (2503.14476, eq. 11 constraint `0 < |correct| < G`) keeps exactly these groups; we
    state it for any real-valued reward: not all valid rewards equal. NaN (skipped) rewards are ignored.
    """
    _check_rewards(rewards_BG, "informative_groups")
    valid_BG = ~torch.isnan(rewards_BG)
    inf = torch.tensor(float("inf"), dtype=rewards_BG.dtype, device=rewards_BG.device)
    high_B = torch.where(valid_BG, rewards_BG, -inf).amax(-1)
    low_B = torch.where(valid_BG, rewards_BG, inf).amin(-1)
    return (high_B != low_B) & (valid_BG.sum(-1) >= 2)


# --------------------------------------------------------------------------------------------------- helpers


def _check_rewards(rewards_BG: Tensor, who: str) -> None:
    if rewards_BG.dim() != 2:
        raise ValueError(f"{who}: rewards must be [num_prompts, group], got shape {tuple(rewards_BG.shape)}")
    if not rewards_BG.is_floating_point():
        raise ValueError(f"{who}: rewards must be a floating-point tensor, got {rewards_BG.dtype}")


def _nanmean(x_BG: Tensor, valid_BG: Tensor, count_B1: Tensor) -> Tensor:
    """Mean over the last dim of the valid entries, [B, 1]; 0 for a row with none."""
    return torch.where(valid_BG, x_BG, 0.0).sum(-1, keepdim=True) / count_B1.clamp(min=1)


def _unbiased_std(centred_BG: Tensor, valid_BG: Tensor, count_B1: Tensor) -> Tensor:
    """Unbiased std over the last dim of already-centred valid entries, [B, 1]; 0 for a row with < 2 of them."""
    squares_BG = torch.where(valid_BG, centred_BG.square(), 0.0)
    return (squares_BG.sum(-1, keepdim=True) / (count_B1 - 1).clamp(min=1)).sqrt()


def _zero_where_no_signal(advantages_BG: Tensor, valid_BG: Tensor, count_B1: Tensor) -> Tensor:
    """0 for skipped samples and for every sample of a group with fewer than two valid ones."""
    return torch.where(valid_BG & (count_B1 >= 2), advantages_BG, 0.0)
