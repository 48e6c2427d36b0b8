"""Schulman's k1/k2/k3 KL estimators: exact small values, k3 >= 0, and unbiasedness by exact expectation."""

import pytest
import torch

from posttrain.algorithms.kl import kl_estimate, kl_k1, kl_k2, kl_k3

# x = lp_ref - lp = [0, 0.5, -0.2]
LP = torch.tensor([[-1.0, -2.0, -0.5]])
LP_REF = torch.tensor([[-1.0, -1.5, -0.7]])


def test_exact_values():
    # k1 = -x = [0, -0.5, 0.2]; k2 = x^2/2 = [0, 0.125, 0.02]
    # k3 = e^x - x - 1 = [0, 1.6487213 - 1.5 = 0.1487213, 0.8187308 - 0.8 = 0.0187308]
    torch.testing.assert_close(kl_k1(LP, LP_REF), torch.tensor([[0.0, -0.5, 0.2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_k2(LP, LP_REF), torch.tensor([[0.0, 0.125, 0.02]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(kl_k3(LP, LP_REF), torch.tensor([[0.0, 0.1487213, 0.0187308]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, fn", [("k1", kl_k1), ("k2", kl_k2), ("k3", kl_k3)])
def test_kl_estimate_dispatches(name, fn):
    assert torch.equal(kl_estimate(name, LP, LP_REF), fn(LP, LP_REF))


def test_unknown_estimator_raises():
    with pytest.raises(ValueError, match="KL estimator"):
        kl_estimate("k4", LP, LP_REF)


def test_k3_is_nonnegative():
    gen = torch.Generator().manual_seed(0)
    lp, lp_ref = -10 * torch.rand(64, 32, generator=gen), -10 * torch.rand(64, 32, generator=gen)
    assert (kl_k3(lp, lp_ref) >= 0).all()
    assert (kl_k2(lp, lp_ref) >= 0).all()


def test_k3_gradient():
    # d k3 / d lp = d/d lp [e^(lp_ref - lp) - (lp_ref - lp) - 1] = 1 - e^x: [0, 1 - 1.6487213, 1 - 0.8187308]
    lp = LP.clone().requires_grad_(True)
    kl_k3(lp, LP_REF).sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -0.6487213, 0.1812692]]), atol=1e-6, rtol=0)


def test_k1_and_k3_are_unbiased():
    # twin: E_{y~p}[k(y)] summed exactly over a 5-token vocabulary equals KL(p || q) = sum p log(p / q)
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=gen, dtype=torch.float64).log_softmax(-1)
    logq = torch.randn(3, 5, generator=gen, dtype=torch.float64).log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    for estimator in (kl_k1, kl_k3):
        expectation = (logp.exp() * estimator(logp, logq)).sum(-1)
        torch.testing.assert_close(expectation, kl, atol=1e-6, rtol=0)
