"""SFT token-mean NLL: hand value and micro-batch invariance."""

import pytest
import torch

from posttrain.algorithms.losses import sft_nll


def test_sft_nll_by_hand():
    # supervised tokens: -1, -2 (row 0), -3 (row 1) -> NLL (1 + 2 + 3) / 3 = 2; prompt/pad positions ignored
    lp = torch.tensor([[-9.0, -1.0, -2.0], [-3.0, float("nan"), -9.0]])
    mask = torch.tensor([[0, 1, 1], [1, 0, 0]])
    loss, metrics = sft_nll(lp, mask)
    assert loss.item() == pytest.approx(2.0, abs=1e-6)
    assert metrics == {"nll": pytest.approx(2.0, abs=1e-6), "num_tokens": 3.0}


def test_sft_one_by_four_equals_four_by_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, requires_grad=True)
    lp = torch.nn.functional.logsigmoid(logits)  # any differentiable log-probs will do
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    full, _ = sft_nll(lp, mask)
    (full_grad,) = torch.autograd.grad(full, logits, retain_graph=True)
    step_tokens = float(mask.sum())
    total = torch.zeros(())
    for i in range(4):  # 4 micro-batches of 1, each told the step-wide token count
        part, _ = sft_nll(lp[i : i + 1], mask[i : i + 1], num_tokens=step_tokens)
        total = total + part
    (micro_grad,) = torch.autograd.grad(total, logits)
    torch.testing.assert_close(total, full.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(micro_grad, full_grad, atol=1e-6, rtol=0)
