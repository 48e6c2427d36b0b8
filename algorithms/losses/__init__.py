"""Per-token losses: pure functions of tensors returning `(loss, metrics)` with detached metrics."""

from posttrain.algorithms.losses.distill import (
    generalized_jsd,
    generalized_jsd_per_token,
    opd_advantages,
    reverse_kl_sampled,
)
from posttrain.algorithms.losses.policy import clipped_policy_loss, gspo_policy_loss, sequence_log_ratio
from posttrain.algorithms.losses.preference import (
    dpo_hinge,
    dpo_ipo,
    dpo_robust,
    dpo_sigmoid,
    log1mexp,
    orpo,
    sequence_logprob,
)
from posttrain.algorithms.losses.reward_model import bradley_terry
from posttrain.algorithms.losses.sft import sft_nll

__all__ = [
    "bradley_terry",
    "clipped_policy_loss",
    "dpo_hinge",
    "dpo_ipo",
    "dpo_robust",
    "dpo_sigmoid",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "gspo_policy_loss",
    "log1mexp",
    "opd_advantages",
    "orpo",
    "reverse_kl_sampled",
    "sequence_log_ratio",
    "sequence_logprob",
    "sft_nll",
]
