"""DPO variants and ORPO against hand-computed values (ALGORITHMS.md's worked values included)."""

import math

import pytest
import torch

from posttrain.algorithms.losses import dpo_hinge, dpo_ipo, dpo_robust, dpo_sigmoid, log1mexp, orpo, sequence_logprob


def _worked_pair():
    # d_c = -1.0 - (-2.0) = 1.0, d_r = -3.0 - (-2.5) = -0.5, z = 1.5
    return torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5])


def test_sequence_logprob_sums_masked_tokens_only():
    # row 0: -1 + -2 = -3 (padding NaN ignored); row 1: -0.5
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-4.0, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 1, 0]])
    torch.testing.assert_close(sequence_logprob(lp, mask), torch.tensor([-3.0, -0.5]), atol=1e-6, rtol=0)


def test_dpo_sigmoid_worked_value_and_metrics():
    # beta z = 0.15: -log sigmoid(0.15) = log(1 + e^-0.15) = 0.6209570
    loss, metrics = dpo_sigmoid(*_worked_pair(), beta=0.1)
    assert loss.item() == pytest.approx(0.620957, abs=1e-6)
    # rewards: beta d_c = 0.1, beta d_r = -0.05, margin 0.15, d_c > d_r
    assert metrics["rewards/chosen"] == pytest.approx(0.1, abs=1e-6)
    assert metrics["rewards/rejected"] == pytest.approx(-0.05, abs=1e-6)
    assert metrics["rewards/margin"] == pytest.approx(0.15, abs=1e-6)
    assert metrics["rewards/accuracy"] == 1.0
    assert all(isinstance(v, float) for v in metrics.values())


def test_dpo_hinge_worked_value():
    # relu(1 - 0.15) = 0.85
    loss, _ = dpo_hinge(*_worked_pair(), beta=0.1)
    assert loss.item() == pytest.approx(0.85, abs=1e-6)


def test_dpo_robust_worked_value():
    # [0.9 * 0.6209570 - 0.1 * 0.7709570] / 0.8 = (0.5588613 - 0.0770957) / 0.8 = 0.6022070
    # (log sigmoid(-0.15) = -0.7709570)
    loss, _ = dpo_robust(*_worked_pair(), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.602207, abs=1e-6)
    plain, _ = dpo_sigmoid(*_worked_pair(), beta=0.1)
    assert dpo_robust(*_worked_pair(), beta=0.1)[0].item() == pytest.approx(plain.item(), abs=1e-6)


@pytest.mark.parametrize("variant", [dpo_sigmoid, dpo_robust])
def test_step_zero_policy_equals_reference_gives_ln2(variant):
    # z = 0 -> -log sigmoid(0) = ln 2; robust: (0.9 ln2 - 0.1 * (-ln2)... ) = ((1-eps) + (-eps)) ln2/(1-2eps) = ln 2
    seq = torch.tensor([-3.0, -7.0, -1.5])
    kwargs = {"label_smoothing": 0.2} if variant is dpo_robust else {}
    loss, metrics = variant(seq, seq - 1, seq.clone(), seq - 1, beta=0.1, **kwargs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/accuracy"] == 0.0  # ties count as wrong
    assert metrics["rewards/margin"] == 0.0


def test_dpo_gradient_pushes_chosen_up():
    pi_c = torch.tensor([-1.0], requires_grad=True)
    loss, _ = dpo_sigmoid(pi_c, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), beta=0.1)
    loss.backward()
    # d/dpi_c of -log sigmoid(beta z) = -beta * sigmoid(-beta z) = -0.1 * sigmoid(-0.15) = -0.0462570
    assert pi_c.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-6)


def test_dpo_ipo_by_hand():
    # d_c = [2.0, -1.0], |y_c| = [4, 2]; d_r = [1.0, 0.5], |y_r| = [2, 5]; beta = 0.5 -> 1/(2 beta) = 1
    # h = [2/4 - 1/2, -1/2 - 0.5/5] = [0, -0.6]; loss = [(0 - 1)^2, (-1.6)^2] = [1, 2.56] -> mean 1.78
    zero = torch.zeros(2)
    loss, metrics = dpo_ipo(
        torch.tensor([2.0, -1.0]),
        torch.tensor([1.0, 0.5]),
        zero,
        zero,
        0.5,
        torch.tensor([4.0, 2.0]),
        torch.tensor([2, 5]),
    )
    assert loss.item() == pytest.approx(1.78, abs=1e-6)
    assert metrics["rewards/accuracy"] == 0.5  # 2 > 1, -1 < 0.5


def test_dpo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        dpo_sigmoid(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


def test_orpo_by_hand_on_two_tokens():
    # chosen lps [-0.5, -1.5] -> a_c = -1; rejected [-2, -4, pad] -> a_r = -3
    # log_odds(-1) = -1 - log(1 - e^-1) = -1 - log(0.6321206) = -0.5413249
    # log_odds(-3) = -3 - log(1 - e^-3) = -3 - log(0.9502129) = -2.9489308
    # ratio = 2.4076060; log sigmoid(ratio) = -log(1 + e^-2.4076060) = -0.0862057
    # L = NLL 1.0 - 0.1 * (-0.0862057) = 1.0086206
    chosen = torch.tensor([[-0.5, -1.5]])
    rejected = torch.tensor([[-2.0, -4.0, float("nan")]])
    loss, metrics = orpo(chosen, torch.ones(1, 2), rejected, torch.tensor([[1, 1, 0]]), lam=0.1)
    assert loss.item() == pytest.approx(1.0086206, abs=1e-6)
    assert metrics["nll"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["log_odds_chosen"] == pytest.approx(-0.5413249, abs=1e-6)
    assert metrics["log_odds_rejected"] == pytest.approx(-2.9489308, abs=1e-6)
    assert metrics["log_odds_ratio"] == pytest.approx(2.4076060, abs=1e-6)


def test_log1mexp_is_stable_at_both_ends():
    # a = -1e-8: 1 - e^a = 1e-8 (1 - 5e-9) -> log = log(1e-8) - 5e-9; naive float32 log1p(-exp(a)) gives -inf
    a = torch.tensor([-1e-8, -1.0, -50.0, -200.0], requires_grad=True)
    out = log1mexp(a)
    expected = torch.tensor([math.log(1e-8), math.log(1 - math.exp(-1)), -math.exp(-50.0), -math.exp(-200.0)])
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    # far end: log(1 - e^-50) = -e^-50 (1 + O(e^-50)), checked to relative precision; e^-200 underflows to -0
    assert out[2].item() / -math.exp(-50.0) == pytest.approx(1.0, rel=1e-6)
    out.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_orpo_stays_finite_for_certain_and_hopeless_completions():
    # a_c = 0 exactly (probability 1) and a_r = -1e-8; rejected tokens hopeless at -100
    chosen = torch.tensor([[0.0, 0.0], [-1e-8, -1e-8]], requires_grad=True)
    rejected = torch.tensor([[-100.0, -100.0], [-100.0, -100.0]], requires_grad=True)
    loss, metrics = orpo(chosen, torch.ones(2, 2), rejected, torch.ones(2, 2))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
