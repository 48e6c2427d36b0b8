"""Bradley-Terry reward-model loss against hand-computed values."""

import math

import pytest
import torch

from posttrain.algorithms.losses import bradley_terry


def test_bradley_terry_by_hand_with_margin_and_centering():
    # pair 1: r_c=2, r_r=0.5, margin 0.5 -> -log sigmoid(1.0) = 0.3132617; c (2.5)^2 = 0.1 * 6.25 = 0.625 -> 0.9382617
    # pair 2: r_c=-1, r_r=1, margin 0 -> -log sigmoid(-2) = 2.1269280; c (0)^2 = 0 -> 2.1269280
    # mean = 1.5325949; accuracy 1/2; margin mean (1.5 - 2) / 2 = -0.25
    loss, metrics = bradley_terry(
        torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.5, 0.0]), center_coef=0.1
    )
    assert loss.item() == pytest.approx((0.9382617 + 2.1269280) / 2, abs=1e-6)
    assert metrics["accuracy"] == 0.5
    assert metrics["margin"] == pytest.approx(-0.25, abs=1e-6)


def test_bradley_terry_equal_scores_is_ln2_and_gradient_separates():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([0.3], requires_grad=True)
    loss, _ = bradley_terry(chosen, rejected)
    loss.backward()
    # -log sigmoid(0) = ln 2; d/dr_c = -sigmoid(0) = -0.5, d/dr_r = +0.5
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert chosen.grad.item() == pytest.approx(-0.5, abs=1e-6)
    assert rejected.grad.item() == pytest.approx(0.5, abs=1e-6)


def test_bradley_terry_rejects_bad_shapes():
    with pytest.raises(ValueError):
        bradley_terry(torch.zeros(2), torch.zeros(3))
