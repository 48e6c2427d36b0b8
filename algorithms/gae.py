"""PPO's token-level advantages (GAE with a value model), its clipped value loss and the critic's explained
variance. (REINFORCE++'s critic-free token advantages are in `algorithms/reinforce_pp.py`.)

All inputs are `[batch, tokens]` over the completion, right-padded: `mask_BT` is 1 on the tokens the policy chose
(the actions) and 0 on padding, on masked-out prompt positions and, in a multi-turn episode, on the tokens the
environment and the chat template put between the model's turns (they are not actions). Outputs are exactly 0 at
masked-out positions. These are no-gradient computations: pass detached rewards/values (except
`value_loss`, which needs the gradient of `values_BT`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algorithms.masked import check_bt, masked_mean, masked_sum
from posttrain.algorithms.reduction import token_mean


def gae_token_rewards(scores_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> Tensor:
    """PPO's per-token reward `r_t = -kl_coef * KL_t`, plus the sequence score at the last completion token.

    Ziegler et al. (1909.08593) / InstructGPT (2203.02155, eq. 2), as docs/algorithms.md#ppo states it. [batch, tokens].
    """
    check_bt(mask_BT, "gae_token_rewards", kl_BT)
    mask = mask_BT.bool()
    rewards_BT = torch.where(mask, -kl_coef * kl_BT, 0.0)
    last_B = _last_index(mask)
    has_tokens_B = mask.any(-1)
    rows_B = torch.arange(mask.shape[0], device=mask.device)
    rewards_BT[rows_B, last_B] += torch.where(has_tokens_B, scores_B.to(rewards_BT.dtype), 0.0)
    return rewards_BT


def gae(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation by a backward scan (Schulman et al., 1506.02438, eq. 16; PPO 1707.06347 eq. 11).

    `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lam A_{t+1}`, over the masked tokens only: `t + 1`
    is the row's next masked token, and V and A are 0 after the last one (the episode ends there: no bootstrap from
    padding). Masked-out tokens inside a row (an environment's reply between two model turns) are not steps: the
    last token of a turn bootstraps from the value of the next turn's first token, whose state includes the reply,
    and no discount is spent on the reply (verl's multi-turn GAE does the same). Returns `(advantages_BT,
    returns_BT = A + V)`, both 0 at masked-out positions. Whitening is separate (`whiten`), applied to the
    advantages only, after the returns are formed.
    Deviations: none.
    """
    check_bt(mask_BT, "gae", rewards_BT, values_BT)
    mask_BT = mask_BT.to(values_BT.dtype)
    values_BT = torch.where(mask_BT.bool(), values_BT, 0.0)
    rewards_BT = torch.where(mask_BT.bool(), rewards_BT, 0.0)
    num_tokens = rewards_BT.shape[1]
    advantages = []
    next_value_B = torch.zeros_like(values_BT[:, 0])
    next_advantage_B = torch.zeros_like(values_BT[:, 0])
    for t in reversed(range(num_tokens)):
        step_B = mask_BT[:, t].bool()
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        advantage_B = torch.where(step_B, delta_B + gamma * lam * next_advantage_B, 0.0)
        advantages.append(advantage_B)
        # a masked-out token is not a step: the next step back bootstraps from the step after it
        next_value_B = torch.where(step_B, values_BT[:, t], next_value_B)
        next_advantage_B = torch.where(step_B, advantage_B, next_advantage_B)
    advantages_BT = torch.stack(advantages[::-1], dim=1)
    return advantages_BT, (advantages_BT + values_BT) * mask_BT


def whiten(x_BT: Tensor, mask_BT: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening over the whole batch: `(x - mean) / sqrt(var + eps)` over the masked entries.

    Unbiased variance (as TRL's `masked_whiten`); with `shift_mean=False` the mean is added back (scale only).
    0 at masked-out positions. Fewer than two masked entries: the variance is taken as 0.
    """
    check_bt(mask_BT, "whiten", x_BT)
    mean = masked_mean(x_BT, mask_BT)
    count = float((mask_BT != 0).sum())
    var = masked_sum((x_BT - mean).square(), mask_BT) / max(count - 1, 1.0)
    whitened_BT = (x_BT - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened_BT = whitened_BT + mean
    return torch.where(mask_BT.bool(), whitened_BT, 0.0)


def ppo_advantages(
    scores_B: Tensor,
    values_BT: Tensor,
    mask_BT: Tensor,
    kl_BT: Tensor,
    kl_coef: float,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten_advantages: bool = True,
) -> tuple[Tensor, Tensor]:
    """PPO's token advantages and value targets from sequence scores, the critic's values and the KL to the reference.

    `gae_token_rewards` (per-token `-kl_coef * KL_t`, the score added at the last completion token), then `gae`
    (gamma, lam); the returns `A + V` are taken before the advantages are (optionally) whitened over the batch's
    masked tokens, as in InstructGPT-style PPO (TRL's PPOTrainer, OpenRLHF). Returns `(advantages_BT, returns_BT)`,
    0 at masked-out positions.

    Args:
        scores_B: [batch] sequence rewards (a skipped sample's row of `mask_BT` is all 0; its score is ignored).
        values_BT: [batch, tokens] the critic's value of each completion token before the update (no gradient).
        mask_BT: [batch, tokens] completion mask.
        kl_BT: [batch, tokens] per-token KL estimate (e.g. `kl_estimate("k3", lp_old, lp_ref)` of
            `algorithms.kl`), no gradient.
        kl_coef: the KL penalty's weight in the reward (0 = no KL in the reward).
        gamma, lam: GAE's discount and lambda.
        whiten_advantages: whiten the advantages (masked, whole batch; `whiten`).
    """
    rewards_BT = gae_token_rewards(torch.nan_to_num(scores_B, nan=0.0), kl_BT, mask_BT, kl_coef)
    advantages_BT, returns_BT = gae(rewards_BT, values_BT, mask_BT, gamma, lam)
    if whiten_advantages:
        advantages_BT = whiten(advantages_BT, mask_BT)
    return advantages_BT, returns_BT


def explained_variance(values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor) -> float:
    """`1 - Var(R - V) / Var(R)` over the masked tokens: 1 = the critic predicts the returns, 0 = no better than their
    mean, < 0 = worse. NaN when the returns do not vary (as CleanRL / SB3 report it)."""
    check_bt(mask_BT, "explained_variance", values_BT, returns_BT)
    var_returns = _masked_var(returns_BT, mask_BT)
    if var_returns == 0:
        return float("nan")
    return 1.0 - _masked_var(returns_BT - values_BT, mask_BT) / var_returns


def _masked_var(x_BT: Tensor, mask_BT: Tensor) -> float:
    """Population variance of the masked entries (the ratio in `explained_variance` does not depend on the choice)."""
    mean = masked_mean(x_BT, mask_BT)
    return float(masked_mean((x_BT - mean).square(), mask_BT))


def value_loss(
    values_BT: Tensor,
    old_values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    clip: float,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO's clipped value loss, token mean of `0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`.

    As in OpenAI baselines' PPO2 / TRL (the PPO paper, 1707.06347 eq. 9, has the unclipped squared error).
    `num_tokens` is the step-wide normaliser of `algorithms.reduction.token_mean`.

    Metrics: `value/clip_fraction` (the clipped term was strictly larger), `value/mean`, `value/error`
    (masked mean of (V - R)^2).
    """
    check_bt(mask_BT, "value_loss", values_BT, old_values_BT, returns_BT)
    if clip <= 0:
        raise ValueError(f"value_loss: clip must be > 0, got {clip}")
    clipped_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    unclipped_error_BT = (values_BT - returns_BT).square()
    clipped_error_BT = (clipped_BT - returns_BT).square()
    loss_BT = 0.5 * torch.maximum(unclipped_error_BT, clipped_error_BT)
    loss = token_mean(loss_BT, mask_BT, num_tokens)
    metrics = {
        "value/clip_fraction": float(masked_mean((clipped_error_BT > unclipped_error_BT).float(), mask_BT)),
        "value/mean": float(masked_mean(values_BT.detach(), mask_BT)),
        "value/error": float(masked_mean(unclipped_error_BT.detach(), mask_BT)),
    }
    return loss, metrics


def _last_index(mask_BT: Tensor) -> Tensor:
    """Index of the last nonzero entry of each row, [batch] (0 for an empty row)."""
    positions_BT = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT, positions_BT, 0).amax(-1)
