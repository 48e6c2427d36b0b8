"""Generalised JSD against a worked value and a direct probability-space twin; the sampled reverse KL."""

import pytest
import torch

from posttrain.rl.losses import generalized_jsd, reverse_kl_sampled


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
