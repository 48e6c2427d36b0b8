"""Per-token estimators of KL(pi || pi_ref) from log-probs of sampled tokens (Schulman, "Approximating KL
Divergence", 2020, http://joschu.net/blog/kl-approx.html).

With `x = lp_ref - lp` (log of pi_ref/pi at the sampled token, the token drawn from pi):
  k1 = -x                  unbiased, high variance, can be negative per token;
  k2 = x^2 / 2             biased, low variance, >= 0;
  k3 = exp(x) - x - 1      unbiased, low variance, >= 0 (GRPO's KL term, DeepSeekMath 2402.03300 eq. 4).

All functions take `[batch, tokens]` log-probs (any matching shape works) and return the per-token estimate of the same
shape, unmasked: reduce it with `algorithms.reduction.reduce_loss` or `algorithms.masked.masked_mean`. Gradients flow to
both arguments; detach `lp_ref` (it is normally computed under `no_grad`). Masked positions are not sanitised here: if
`lp` can be inf/NaN at padding, zero it there first, since the reducer's `where` cannot stop
`0 * inf` inside these functions' backward.

Deviation, stated: k3 is computed as `expm1(x) - x`, which is the same number but keeps precision for small x.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def kl_k1(lp_BT: Tensor, lp_ref_BT: Tensor) -> Tensor:
    """k1 = lp - lp_ref per token (natural-log units, nats)."""
    return lp_BT - lp_ref_BT


def kl_k2(lp_BT: Tensor, lp_ref_BT: Tensor) -> Tensor:
    """k2 = (lp_ref - lp)^2 / 2 per token (nats)."""
    return 0.5 * (lp_ref_BT - lp_BT).square()


def kl_k3(lp_BT: Tensor, lp_ref_BT: Tensor) -> Tensor:
    """k3 = exp(x) - x - 1 with x = lp_ref - lp, per token (nats); always >= 0."""
    x_BT = lp_ref_BT - lp_BT
    return torch.expm1(x_BT) - x_BT


_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(name: Literal["k1", "k2", "k3"], lp_BT: Tensor, lp_ref_BT: Tensor) -> Tensor:
    """The named estimator (`"k1"`, `"k2"` or `"k3"`) applied per token; see the module docstring."""
    if name not in _ESTIMATORS:
        raise ValueError(f"unknown KL estimator {name!r}; allowed: {', '.join(_ESTIMATORS)}")
    return _ESTIMATORS[name](lp_BT, lp_ref_BT)


def kl_penalized_rewards(rewards_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> Tensor:
    """Sequence rewards with the KL put *in the reward*: `r_i - kl_coef * sum_t KL_t` over masked tokens, [batch].

    The outcome-reward form of the per-token penalty `r_t = -kl_coef * KL_t` (InstructGPT 2203.02155 eq. 2; RLOO
    2402.14740 treats the whole completion as one action): with gamma = 1 the return is the score minus the
    summed penalty. Group-relative and leave-one-out baselines are then computed from these rewards. No gradient: pass a
    detached `kl_BT` (e.g. `kl_estimate(name, lp_old, lp_ref)`). NaN (skipped) rewards stay NaN.
    """
    if kl_BT.dim() != 2 or kl_BT.shape != mask_BT.shape or rewards_B.shape != kl_BT.shape[:1]:
        raise ValueError(
            f"kl_penalized_rewards: rewards {tuple(rewards_B.shape)} must be [batch] and KL {tuple(kl_BT.shape)}, "
            f"mask {tuple(mask_BT.shape)} [batch, tokens]"
        )
    kl_sum_B = torch.where(mask_BT.bool(), kl_BT, 0.0).sum(-1)
    return rewards_B - kl_coef * kl_sum_B
