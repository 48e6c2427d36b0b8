"""On-policy distillation losses: generalised JSD over the full vocabulary, and the sampled per-token reverse KL.

GKD (Agarwal et al., 2306.13649) and the Qwen3 report's on-policy distillation. The teacher scores the tokens the
student sampled; teacher and student must share a tokenizer (the vocabulary sizes are checked here, the tokenizers
themselves by the caller).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from posttrain.algorithms.masked import masked_mean
from posttrain.algorithms.reduction import token_mean


def generalized_jsd(
    student_logits_BTV: Tensor,
    teacher_logits_BTV: Tensor,
    mask_BT: Tensor,
    beta: float,
    temperature: float = 1.0,
    num_tokens: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Generalised JSD per token, masked token mean (GKD 2306.13649, eq. in section 3 "Generalized JSD").

    With `P_S = softmax(s / temperature)`, `P_T = softmax(t / temperature)` and `M = (1 - beta) P_S + beta P_T`:
    `JSD_beta = beta KL(P_T || M) + (1 - beta) KL(P_S || M)` (nats), except at the endpoints, where the formula is
    identically 0 and is replaced by its named limit: beta=0 -> forward KL(P_T || P_S), beta=1 -> reverse
    KL(P_S || P_T) (as TRL's `generalized_jsd_loss`). Everything is in log space; log M is a logsumexp.

    Args:
        student_logits_BTV: [batch, tokens, vocab] student logits (with gradient).
        teacher_logits_BTV: same shape, teacher logits (computed under `no_grad`).
        mask_BT: [batch, tokens], nonzero on the completion tokens that carry loss.
        beta: in [0, 1].
        temperature: both logits are divided by it (> 0).
        num_tokens: step-wide token count, as in `algorithms.reduction.token_mean`; `None` counts this call's tokens.

    Metrics: `jsd` (this call's own token mean).
    Deviations: the endpoints above (the paper's formula is 0 there; the paper itself quotes the limits in the
    scaled sense, JSD_beta / beta -> forward KL as beta -> 0); no scaling by temperature^2.
    """
    jsd_BT = generalized_jsd_per_token(student_logits_BTV, teacher_logits_BTV, mask_BT, beta, temperature)
    loss = token_mean(jsd_BT, mask_BT, num_tokens)
    return loss, {"jsd": float(masked_mean(jsd_BT.detach(), mask_BT))}


def generalized_jsd_per_token(
    student_logits_BTV: Tensor, teacher_logits_BTV: Tensor, mask_BT: Tensor, beta: float, temperature: float = 1.0
) -> Tensor:
    """`generalized_jsd`'s per-token values [batch, tokens] (nats), 0 where the mask is 0; reduce them as you choose
    (`algorithms.reduction.reduce_loss`). Same arguments, definitions and endpoint limits as `generalized_jsd`."""
    if student_logits_BTV.shape != teacher_logits_BTV.shape:
        raise ValueError(
            f"generalized_jsd: student logits {tuple(student_logits_BTV.shape)} and teacher logits "
            f"{tuple(teacher_logits_BTV.shape)} differ; student and teacher must share a tokenizer (same vocabulary)"
        )
    if student_logits_BTV.dim() != 3 or mask_BT.shape != student_logits_BTV.shape[:2]:
        raise ValueError(
            f"generalized_jsd: expected [batch, tokens, vocab] logits and a [batch, tokens] mask, got "
            f"{tuple(student_logits_BTV.shape)} and {tuple(mask_BT.shape)}"
        )
    if not 0 <= beta <= 1 or temperature <= 0:
        raise ValueError(f"generalized_jsd: need 0 <= beta <= 1 and temperature > 0, got {beta}, {temperature}")
    # Zero the logits at masked positions first, so padding garbage cannot reach the gradient via softmax's backward.
    keep_BT1 = mask_BT.bool().unsqueeze(-1)
    log_s_BTV = torch.log_softmax(torch.where(keep_BT1, student_logits_BTV, 0.0) / temperature, dim=-1)
    log_t_BTV = torch.log_softmax(torch.where(keep_BT1, teacher_logits_BTV, 0.0) / temperature, dim=-1)
    if beta == 0:
        jsd_BT = _kl(log_t_BTV, log_s_BTV)
    elif beta == 1:
        jsd_BT = _kl(log_s_BTV, log_t_BTV)
    else:
        # log M = logsumexp(log(1 - beta) + log P_S, log beta + log P_T), elementwise over the vocabulary
        log_m_BTV = torch.logaddexp(log_s_BTV + math.log(1 - beta), log_t_BTV + math.log(beta))
        jsd_BT = beta * _kl(log_t_BTV, log_m_BTV) + (1 - beta) * _kl(log_s_BTV, log_m_BTV)
    return torch.where(mask_BT.bool(), jsd_BT, 0.0)


def reverse_kl_sampled(student_logprobs_BT: Tensor, teacher_logprobs_BT: Tensor) -> Tensor:
    """Per-token sampled estimate of KL(student || teacher) at the student's own tokens: `lp_s - lp_t`, [batch, tokens].

    Its negative, `lp_t - lp_s`, is OPD's dense per-token reward/advantage (GKD 2306.13649 with beta=1; Qwen3
    report). Unreduced and unmasked, like `algorithms.kl`; detach it when used as a reward. An unbiased estimate of the
    per-token reverse KL only because the tokens are sampled from the student.
    """
    if student_logprobs_BT.shape != teacher_logprobs_BT.shape:
        raise ValueError(
            f"reverse_kl_sampled: shapes {tuple(student_logprobs_BT.shape)} and {tuple(teacher_logprobs_BT.shape)} "
            "differ"
        )
    return student_logprobs_BT - teacher_logprobs_BT


def _kl(log_p_BTV: Tensor, log_q_BTV: Tensor) -> Tensor:
    """KL(P || Q) = sum_v P (log P - log Q) per token, [batch, tokens]; 0 * (-inf) terms of P = 0 count as 0."""
    terms_BTV = log_p_BTV.exp() * (log_p_BTV - log_q_BTV)
    return torch.where(log_p_BTV.exp() > 0, terms_BTV, 0.0).sum(-1)


def opd_advantages(
    teacher_logprobs_BT: Tensor,
    student_logprobs_BT: Tensor,
    mask_BT: Tensor,
    reward_advantages_B: Tensor | None = None,
    reward_coef: float = 0.0,
) -> Tensor:
    """OPD's per-token advantage [batch, tokens]: `A_t = (lp_teacher - lp_student)_t + reward_coef * A_reward`.

    The first term is minus the sampled per-token reverse KL (`reverse_kl_sampled`), i.e. the teacher's grade of
    each token the student sampled (GKD 2306.13649 with beta=1, on-policy; Qwen3 report). It is detached: it is a
    reward, the gradient comes from the policy loss's log-prob. `reward_advantages_B` ([batch], e.g. the
    group-relative advantage of verifiable rewards) is broadcast over each sequence's tokens with weight
    `reward_coef`. Returns 0 (not NaN) wherever the mask is 0, whatever the inputs hold there.

    Deviation, stated: each token's advantage is its own reverse-KL term only (no sum of the KL still to come,
    i.e. discount 0, as Thinking Machines' on-policy distillation does); the full return would be the REINFORCE++
    KL-to-go (`algorithms.reinforce_pp`).
    """
    if teacher_logprobs_BT.shape != student_logprobs_BT.shape or mask_BT.shape != student_logprobs_BT.shape:
        raise ValueError(
            f"opd_advantages: teacher {tuple(teacher_logprobs_BT.shape)}, student "
            f"{tuple(student_logprobs_BT.shape)} and mask {tuple(mask_BT.shape)} must be one [batch, tokens] shape"
        )
    mask = mask_BT.bool()
    advantages_BT = -reverse_kl_sampled(student_logprobs_BT.detach(), teacher_logprobs_BT.detach())
    if reward_advantages_B is not None and reward_coef != 0:
        if reward_advantages_B.shape != mask.shape[:1]:
            raise ValueError(f"opd_advantages: reward advantages {tuple(reward_advantages_B.shape)} must be [batch]")
        advantages_BT = advantages_BT + reward_coef * reward_advantages_B.detach()[:, None]  # [B] -> [B, 1]
    return torch.where(mask, advantages_BT, 0.0)
