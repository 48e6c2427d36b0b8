"""Generalised JSD against a worked value and a direct probability-space twin; the sampled reverse KL."""

import pytest
import torch

from posttrain.algorithms.losses import (
    clipped_policy_loss,
    generalized_jsd,
    generalized_jsd_per_token,
    opd_advantages,
    reverse_kl_sampled,
)
from posttrain.algorithms.reduction import reduce_loss


def test_jsd_worked_value():
    # beta=0.5: M = [0.5, 0.5]; KL(P_T||M) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.5290080 - 0.1609438 = 0.3680642,
    # KL(P_S||M) the same by symmetry -> 0.5 * 0.3680642 + 0.5 * 0.3680642 = 0.368064
    student = torch.tensor([[[0.1, 0.9]]]).log()
    teacher = torch.tensor([[[0.9, 0.1]]]).log()
    loss, metrics = generalized_jsd(student, teacher, torch.ones(1, 1), beta=0.5)
    assert loss.item() == pytest.approx(0.368064, abs=1e-6)
    assert metrics["jsd"] == pytest.approx(0.368064, abs=1e-6)


def _direct_jsd(student_logits, teacher_logits, beta):
    """Probability-space twin: plain softmax, log of the mixture, the endpoints as named KLs."""
    p_s, p_t = student_logits.softmax(-1), teacher_logits.softmax(-1)
    if beta == 0:
        return (p_t * (p_t / p_s).log()).sum(-1)
    if beta == 1:
        return (p_s * (p_s / p_t).log()).sum(-1)
    m = (1 - beta) * p_s + beta * p_t
    return beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_probability_space_twin(beta):
    gen = torch.Generator().manual_seed(int(beta * 10))
    student = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0]])
    student[0, 2] = float("nan")  # padding garbage must not leak
    loss, _ = generalized_jsd(student, teacher, mask, beta=beta)
    expected = _direct_jsd(student[:, :2], teacher[:, :2], beta).mean()
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_jsd_endpoints_are_the_named_kls_and_gradients_are_finite():
    student = torch.randn(2, 3, 5, requires_grad=True)
    teacher = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3)
    forward, _ = generalized_jsd(student, teacher, mask, beta=0.0)
    reverse, _ = generalized_jsd(student, teacher, mask, beta=1.0)
    assert forward.item() > 0 and reverse.item() > 0
    (forward + reverse).backward()
    assert torch.isfinite(student.grad).all()
    same, _ = generalized_jsd(teacher, teacher, mask, beta=0.3)
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_jsd_temperature_divides_logits():
    student, teacher = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    hot, _ = generalized_jsd(student, teacher, torch.ones(1, 2), beta=0.3, temperature=2.0)
    plain, _ = generalized_jsd(student / 2, teacher / 2, torch.ones(1, 2), beta=0.3)
    assert hot.item() == pytest.approx(plain.item(), abs=1e-6)


def test_jsd_refuses_vocabulary_mismatch():
    with pytest.raises(ValueError, match="share a tokenizer"):
        generalized_jsd(torch.zeros(1, 2, 4), torch.zeros(1, 2, 5), torch.ones(1, 2), beta=0.5)


def test_reverse_kl_sampled_is_per_token_difference():
    # lp_s - lp_t: [-1 - (-3), -2 - (-0.5)] = [2, -1.5]
    out = reverse_kl_sampled(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-3.0, -0.5]]))
    torch.testing.assert_close(out, torch.tensor([[2.0, -1.5]]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ OPD's per-token advantage (reverse_kl loss)

TEACHER = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.25, -3.0, -1.0, -1.0]])
STUDENT = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-0.75, -0.5, -2.0, -1.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


def test_opd_advantage_is_teacher_minus_student_per_token_plus_scaled_reward():
    # row 0: [-1 - (-1.5), -2 - (-1), -0.5 - (-0.5), pad] = [0.5, -1.0, 0.0, 0]
    # row 1: [-0.25 + 0.75, -3 + 0.5, pad, pad] = [0.5, -2.5, 0, 0]
    adv = opd_advantages(TEACHER, STUDENT, MASK)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.5, -2.5, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # rewards' advantages [1, -2] x reward_coef 0.5 -> +0.5 on row 0's tokens, -1.0 on row 1's; padding stays 0
    mixed = opd_advantages(TEACHER, STUDENT, MASK, torch.tensor([1.0, -2.0]), reward_coef=0.5)
    torch.testing.assert_close(mixed, torch.tensor([[1.0, -0.5, 0.5, 0.0], [-0.5, -3.5, 0.0, 0.0]]), atol=1e-6, rtol=0)
    # reward_coef 0 ignores the rewards entirely
    torch.testing.assert_close(opd_advantages(TEACHER, STUDENT, MASK, torch.tensor([1.0, -2.0]), 0.0), adv)


def test_opd_advantage_is_minus_the_sampled_reverse_kl_and_is_detached():
    student = STUDENT.clone().requires_grad_(True)
    adv = opd_advantages(TEACHER, student, MASK)
    assert not adv.requires_grad
    torch.testing.assert_close(adv, torch.where(MASK.bool(), -reverse_kl_sampled(STUDENT, TEACHER), 0.0))


def test_opd_advantage_ignores_garbage_on_padding():
    teacher, student = TEACHER.clone(), STUDENT.clone()
    teacher[0, 3], student[1, 2:] = float("nan"), float("-inf")
    adv = opd_advantages(teacher, student, MASK, torch.tensor([1.0, 1.0]), 1.0)
    assert torch.isfinite(adv).all() and (adv[~MASK.bool()] == 0).all()


def _opd_step(teacher_BT, student_BT, mask_BT, num_tokens):
    """One policy-gradient step's loss and d loss / d lp as the learner computes them with one update per batch
    (lp_old = lp detached, so ratio = 1 and the clipped surrogate is -A per token), token-mean over the step."""
    lp = student_BT.clone().requires_grad_(True)
    adv = opd_advantages(teacher_BT, lp.detach(), mask_BT)
    per_token, _ = clipped_policy_loss(lp, lp.detach(), adv, mask_BT)
    loss = reduce_loss(per_token, mask_BT, "token-mean", num_tokens=num_tokens)
    loss.backward()
    return loss.detach(), lp.grad


def test_opd_policy_step_hand_value_and_gradient():
    # advantages [[0.5, -1, 0], [0.5, -2.5]] over 5 tokens: loss = -(0.5 - 1 + 0 + 0.5 - 2.5) / 5 = 2.5 / 5 = 0.5;
    # d loss / d lp_t = -A_t / 5: a token the teacher likes more than the student (A > 0) is pushed up
    loss, grad = _opd_step(TEACHER, STUDENT, MASK, num_tokens=5)
    assert loss.item() == pytest.approx(0.5, abs=1e-6)
    expected = torch.tensor([[-0.1, 0.2, 0.0, 0.0], [-0.1, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


def test_opd_policy_step_is_padding_and_micro_batch_invariant():
    loss, grad = _opd_step(TEACHER, STUDENT, MASK, num_tokens=5)
    # two more padded columns holding garbage: same loss, same gradient on the real columns, 0 on the new ones
    pad = torch.full((2, 2), float("nan"))
    mask = torch.cat([MASK, torch.zeros(2, 2, dtype=MASK.dtype)], 1)
    padded = _opd_step(torch.cat([TEACHER, pad], 1), torch.cat([STUDENT, pad], 1), mask, num_tokens=5)
    torch.testing.assert_close(padded[0], loss, atol=1e-7, rtol=0)
    torch.testing.assert_close(padded[1], torch.cat([grad, torch.zeros(2, 2)], 1), atol=1e-7, rtol=0)
    # the two rows as two micro-batches with the step's token count: the shares add up to the whole
    parts = [_opd_step(TEACHER[i : i + 1], STUDENT[i : i + 1], MASK[i : i + 1], 5) for i in range(2)]
    torch.testing.assert_close(parts[0][0] + parts[1][0], loss, atol=1e-7, rtol=0)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), grad, atol=1e-7, rtol=0)


def test_jsd_per_token_is_zero_on_padding_and_reduces_to_generalized_jsd():
    gen = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    per_token = generalized_jsd_per_token(student, teacher, mask, beta=0.5)
    assert (per_token[~mask.bool()] == 0).all() and (per_token[mask.bool()] > 0).all()
    loss, _ = generalized_jsd(student, teacher, mask, beta=0.5)
    torch.testing.assert_close(reduce_loss(per_token, mask, "token-mean"), loss, atol=1e-7, rtol=0)
