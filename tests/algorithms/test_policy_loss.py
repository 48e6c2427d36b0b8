"""The clipped surrogate against hand-computed values, gradients, clip metrics, dual clip and masking.

Hand-value tests build `lp = log(ratio)` with `lp_old = 0` in float64, so that exp(log(r)) == r to ~1e-16 and
the expected numbers are exactly the arithmetic in the comments.
"""

import math

import pytest
import torch

from posttrain.algorithms.losses import clipped_policy_loss
from posttrain.algorithms.reduction import reduce_loss

NAN, INF = float("nan"), float("inf")


def _loss(ratios, advantages, mask=None, **kw):
    """Per-token loss and grad d L_t / d lp_t for rows of ratios [B, T] and advantages [B] (lp_old = 0)."""
    ratio_BT = torch.tensor(ratios, dtype=torch.float64)
    lp_BT = ratio_BT.log().requires_grad_(True)
    mask_BT = torch.ones_like(ratio_BT) if mask is None else torch.tensor(mask, dtype=torch.float64)
    adv_B = torch.tensor(advantages, dtype=torch.float64)
    loss_BT, metrics = clipped_policy_loss(lp_BT, torch.zeros_like(lp_BT), adv_B, mask_BT, **kw)
    loss_BT.sum().backward()
    return loss_BT.detach(), lp_BT.grad, metrics


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_positive_advantage():
    # A = 2, eps = 0.2, clip range [0.8, 1.2]; L = -min(r A, clip(r) A); dL/dlp = -A r on the unclipped branch
    # r = 0.5: min(1.0, 0.8 * 2 = 1.6) = 1.0 -> L = -1.0, unclipped (pessimistic side), grad -2 * 0.5 = -1.0
    # r = 1.1: min(2.2, 2.2) = 2.2 -> L = -2.2, inside the range, grad -2 * 1.1 = -2.2
    # r = 1.5: min(3.0, 1.2 * 2 = 2.4) = 2.4 -> L = -2.4, clipped, grad 0
    loss, grad, metrics = _loss([[0.5, 1.1, 1.5]], [2.0])
    _close(loss, [[-1.0, -2.2, -2.4]])
    _close(grad, [[-1.0, -2.2, 0.0]])
    assert math.isclose(metrics["clip_fraction"], 1 / 3)


def test_negative_advantage():
    # A = -1: L = -min(-r, -clip(r)) = max(r, clip(r))
    # r = 0.5: min(-0.5, -0.8) = -0.8 -> L = 0.8, clipped, grad 0
    # r = 0.9: min(-0.9, -0.9) -> L = 0.9, inside, grad -A r = 0.9
    # r = 1.5: min(-1.5, -1.2) = -1.5 -> L = 1.5, unclipped (pessimistic side), grad 1.5
    loss, grad, metrics = _loss([[0.5, 0.9, 1.5]], [-1.0])
    _close(loss, [[0.8, 0.9, 1.5]])
    _close(grad, [[0.0, 0.9, 1.5]])
    assert math.isclose(metrics["clip_fraction"], 1 / 3)


def test_clip_higher():
    # eps_low = 0.2, eps_high = 0.28: range [0.8, 1.28]
    # A = 1:  r = 1.25 -> min(1.25, 1.25) -> L = -1.25 (would be clipped to -1.2 with eps_high = 0.2)
    #         r = 1.3  -> min(1.3, 1.28) -> L = -1.28, clipped
    # A = -1: r = 0.75 -> min(-0.75, -0.8) = -0.8 -> L = 0.8, clipped; r = 0.85 -> L = 0.85, inside
    loss, grad, metrics = _loss([[1.25, 1.3], [0.75, 0.85]], [1.0, -1.0], eps_low=0.2, eps_high=0.28)
    _close(loss, [[-1.25, -1.28], [0.8, 0.85]])
    _close(grad, [[-1.25, 0.0], [0.0, 0.85]])
    assert metrics["clip_fraction"] == 0.5


def test_dual_clip():
    # c = 3, so for A < 0 the loss is capped at c |A|
    # A = -1: r = 5   -> PPO L = max(5, 1.2) = 5 > 3 -> capped at 3, grad 0
    #         r = 1.5 -> L = 1.5 < 3, unchanged, grad 1.5
    # A = 2:  r = 5   -> L = -min(10, 2.4) = -2.4; the cap does not apply to A > 0
    loss, grad, metrics = _loss([[5.0, 1.5], [5.0, 1.0]], [-1.0, 2.0], dual_clip=3.0)
    _close(loss, [[3.0, 1.5], [-2.4, -2.0]])
    _close(grad, [[0.0, 1.5], [0.0, -2.0]])
    assert metrics["dual_clip_fraction"] == 0.25
    # without it the first token is PPO's 5 and no dual_clip metric is reported
    loss, _, metrics = _loss([[5.0, 1.5], [5.0, 1.0]], [-1.0, 2.0])
    assert math.isclose(loss[0, 0], 5.0, abs_tol=1e-6) and "dual_clip_fraction" not in metrics


@pytest.mark.parametrize("c", [1.0, 0.5])
def test_dual_clip_must_exceed_one(c):
    with pytest.raises(ValueError, match="dual_clip"):
        _loss([[1.0]], [1.0], dual_clip=c)


def test_gradient_at_ratio_one_is_reinforce():
    # lp == lp_old: ratio 1, both min branches equal, and d L / d lp = -A * ratio = -A. With token-mean over N
    # tokens the gradient is -A / N, the REINFORCE gradient of -(A * lp) averaged over the same tokens.
    gen = torch.Generator().manual_seed(0)
    lp_BT = (-3 * torch.rand(3, 5, generator=gen)).requires_grad_(True)
    adv_B = torch.tensor([1.5, -0.5, 0.0])
    mask_BT = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float32)
    loss_BT, metrics = clipped_policy_loss(lp_BT, lp_BT.detach(), adv_B, mask_BT)
    reduce_loss(loss_BT, mask_BT, "token-mean").backward()
    expected_BT = -adv_B[:, None] * mask_BT / 10  # 10 masked tokens
    torch.testing.assert_close(lp_BT.grad, expected_BT, atol=1e-6, rtol=0)

    lp2_BT = lp_BT.detach().clone().requires_grad_(True)
    reduce_loss(-adv_B[:, None] * lp2_BT, mask_BT, "token-mean").backward()
    torch.testing.assert_close(lp_BT.grad, lp2_BT.grad, atol=1e-6, rtol=0)
    assert metrics == {"clip_fraction": 0.0, "ratio/mean": 1.0, "ratio/min": 1.0, "ratio/max": 1.0}


def test_clip_fraction_and_ratio_stats_count_masked_tokens_only():
    # 8 masked tokens; clipped among them: (A=1, r=1.5), (A=1, r=1.3), (A=-1, r=0.6) -> 3/8 = 0.375.
    # Not clipped: r=0.5 with A=1 and r=1.4 with A=-1 (pessimistic side), r=1.0, r=0.9, and A=0 at r=2.
    # The masked-out tokens (r = 3 and 0.1, both would be clipped) count in nothing.
    ratios = [[1.5, 1.3, 0.5, 1.0, 3.0], [0.6, 1.4, 0.9, 0.1, 1.0], [2.0, 1.0, 1.0, 1.0, 1.0]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]
    _, _, metrics = _loss(ratios, [1.0, -1.0, 0.0], mask)
    assert metrics["clip_fraction"] == 0.375
    # ratios over masked tokens: 1.5, 1.3, 0.5, 1.0, 0.6, 1.4, 0.9, 2.0 -> sum 9.2, mean 1.15, min 0.5, max 2.0
    assert math.isclose(metrics["ratio/mean"], 1.15, abs_tol=1e-6)
    assert math.isclose(metrics["ratio/min"], 0.5, abs_tol=1e-6)
    assert math.isclose(metrics["ratio/max"], 2.0, abs_tol=1e-6)
    assert all(isinstance(v, float) for v in metrics.values())


def test_masked_positions_are_exactly_zero_even_with_garbage():
    # garbage (inf, -inf, NaN) in lp, lp_old and the advantage of an all-masked (skipped) row
    lp_BT = torch.tensor([[-0.5, -1.0, INF], [-0.2, -INF, NAN], [NAN, NAN, NAN]], requires_grad=True)
    old_BT = torch.tensor([[-0.6, -0.9, 0.0], [-0.1, NAN, -INF], [INF, 0.0, NAN]])
    adv_B = torch.tensor([1.0, -2.0, NAN])
    mask_BT = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.float32)
    loss_BT, metrics = clipped_policy_loss(lp_BT, old_BT, adv_B, mask_BT, dual_clip=3.0)
    reduce_loss(loss_BT, mask_BT, "token-mean").backward()
    assert torch.equal(loss_BT[mask_BT == 0], torch.zeros(6))
    assert torch.equal(lp_BT.grad[mask_BT == 0], torch.zeros(6))
    assert torch.isfinite(loss_BT).all() and torch.isfinite(lp_BT.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())

    # the real tokens are what clean inputs give
    clean_lp = torch.tensor([[-0.5, -1.0], [-0.2, 0.0]])
    clean_old = torch.tensor([[-0.6, -0.9], [-0.1, 0.0]])
    clean, _ = clipped_policy_loss(clean_lp, clean_old, adv_B[:2], torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(loss_BT[:2, :2].detach(), clean, atol=1e-6, rtol=0)


def test_padding_columns_change_nothing():
    gen = torch.Generator().manual_seed(1)
    lp_BT, old_BT = -torch.rand(2, 4, generator=gen), -torch.rand(2, 4, generator=gen)
    adv_B, mask_BT = torch.tensor([0.7, -1.3]), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss_BT, metrics = clipped_policy_loss(lp_BT, old_BT, adv_B, mask_BT)

    pad = torch.full((2, 3), -50.0)  # three more columns, mask 0
    padded_BT, padded_metrics = clipped_policy_loss(
        torch.cat([lp_BT, pad], 1), torch.cat([old_BT, -pad], 1), adv_B, torch.cat([mask_BT, torch.zeros(2, 3)], 1)
    )
    assert torch.equal(padded_BT[:, :4], loss_BT) and torch.equal(padded_BT[:, 4:], torch.zeros(2, 3))
    assert padded_metrics == metrics


def test_per_sequence_and_per_token_advantages_agree():
    gen = torch.Generator().manual_seed(2)
    lp_BT, old_BT = -torch.rand(3, 4, generator=gen), -torch.rand(3, 4, generator=gen)
    adv_B, mask_BT = torch.tensor([0.5, -1.0, 2.0]), torch.ones(3, 4)
    per_seq, _ = clipped_policy_loss(lp_BT, old_BT, adv_B, mask_BT)
    per_token, _ = clipped_policy_loss(lp_BT, old_BT, adv_B[:, None].expand(3, 4), mask_BT)
    assert torch.equal(per_seq, per_token)


def test_bad_shapes_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="advantages"):
        clipped_policy_loss(x, x, torch.zeros(3), x)
    with pytest.raises(ValueError, match="same"):
        clipped_policy_loss(x, x[:, :2], torch.zeros(2), x)
